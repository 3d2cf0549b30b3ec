"""The experiment presets (conf/experiment/): each composes and validates, the GPT-2 recipes carry the published
numbers, and each ablation's sweep expands to its configs x 3 seeds, every job a valid config."""

import itertools

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gptlab.config import load_config
from tests.conftest import CONF, compose_train

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SEEDS = ["0", "1", "2"]
# ablation -> the swept keys and their values (besides seed)
ABLATIONS = {
    "ablate_warmup": {"scheduler.warmup_steps": ["0", "8"]},
    "ablate_clipping": {"grad_clip": ["0", "0.25", "1.0"]},
    "ablate_norm_position": {"model.norm_position": ["pre", "post"]},
    "ablate_adamw_vs_adam_l2": {"optimizer": ["adamw", "adam"]},
    "ablate_schedules": {"scheduler": ["cosine", "wsd", "constant", "linear"]},
    "ablate_label_smoothing": {"model.label_smoothing": ["0.0", "0.1"]},
    "ablate_precision": {"precision": ["fp32", "bf16", "bf16_true"]},
    "ablate_radam_vs_warmup": {"optimizer": ["adamw", "radam"], "scheduler.warmup_steps": ["0", "8"]},
    "ablate_architecture": {"arch": sorted(p.stem for p in (CONF / "arch").glob("*.yaml"))},
    "ablate_data_mixture": {"data.mixture.sample_code.weight": ["0.0", "0.25", "1.0"]},
}
TOKENS_PER_STEP = 524_288  # 2**19, GPT-3 Small/Medium/Large's 0.5M-token batch


def sweep_params(experiment: str) -> dict[str, str]:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params or {})


def expand(params: dict[str, str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper launches: the cartesian product of the swept values."""
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in overrides]
    return [list(job) for job in itertools.product(*axes)]


def test_every_ablation_is_tested():
    assert sorted(e for e in EXPERIMENTS if e.startswith("ablate_")) == sorted(ABLATIONS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    cfg, _ = load_config(compose_train([f"experiment={experiment}"]))
    assert cfg.tags, "an experiment tags its runs"


@pytest.mark.parametrize(
    "experiment, model, data, batch_tokens, steps, lr, warmup",
    [
        ("gpt2_124m_fineweb_edu", (12, 12, 768), "fineweb_edu", TOKENS_PER_STEP, 19_073, 6e-4, 715),
        ("gpt2_124m_slimpajama", (12, 12, 768), "slimpajama", TOKENS_PER_STEP, 19_073, 6e-4, 715),
        ("gpt2_350m_fineweb_edu", (24, 16, 1024), "fineweb_edu", TOKENS_PER_STEP, 19_073, 3e-4, 715),
        ("gpt2_774m_fineweb_edu", (36, 20, 1280), "fineweb_edu", TOKENS_PER_STEP, 29_525, 2.5e-4, 715),
        ("gpt2_1558m_fineweb_edu", (48, 25, 1600), "fineweb_edu", 2 * TOKENS_PER_STEP, 29_716, 2e-4, 358),
    ],
)
def test_gpt2_recipes_have_the_published_numbers(experiment, model, data, batch_tokens, steps, lr, warmup):
    cfg, plan = load_config(compose_train([f"experiment={experiment}"]))
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (*model, 1024)
    assert cfg.data.name == data and cfg.data.seq_len == 1024
    assert cfg.global_batch_tokens == plan.tokens_per_step == batch_tokens
    assert plan.total_steps == steps and cfg.max_tokens == steps * batch_tokens
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == lr
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.betas == [0.9, 0.95]
    # GPT-3: warmup over the first 375M tokens, then cosine decay to 10% of the peak LR
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.warmup_steps == warmup
    assert warmup * batch_tokens == pytest.approx(375e6, rel=0.01)
    assert cfg.scheduler.min_lr_ratio * cfg.optimizer.lr == pytest.approx(lr / 10)
    assert cfg.grad_clip == 1.0 and cfg.precision.trainer_precision == "bf16-mixed" and cfg.model.compile
    assert cfg.eval.every_n_steps == cfg.eval.hellaswag.every_n_steps == 250
    assert cfg.eval.hellaswag.enabled and cfg.eval.hellaswag.limit is None  # all 10,042 examples
    assert 1000 <= cfg.callbacks.checkpoint.every_n_steps <= 2000


def test_gpt2_124m_is_build_nanogpt():
    """10B tokens in 19,073 steps; lr 6e-4 -> 6e-5; micro-batch 64 x 1024 (8 accumulation steps on one GPU)."""
    cfg, plan = load_config(compose_train(["experiment=gpt2_124m_fineweb_edu"]))
    assert plan.total_tokens == 19_073 * 524_288 == pytest.approx(10e9, rel=1e-3)
    assert cfg.data.micro_batch_size == 64 and plan.grad_accum == 8
    assert cfg.optimizer.lr * cfg.scheduler.min_lr_ratio == pytest.approx(6e-5)


SLOW_ABLATIONS = {"ablate_architecture"}  # 33 jobs to compose and check: ~7 s, in the slow tier


@pytest.mark.parametrize(
    "experiment", [pytest.param(e, marks=pytest.mark.slow) if e in SLOW_ABLATIONS else e for e in sorted(ABLATIONS)]
)
def test_ablation_sweeps_its_values_over_three_seeds(experiment):
    swept = ABLATIONS[experiment]
    params = sweep_params(experiment)
    assert set(params) == {*swept, "seed"}
    jobs = expand(params)
    axes = [[f"{key}={v}" for v in values] for key, values in swept.items()] + [[f"seed={s}" for s in SEEDS]]
    assert sorted(jobs) == sorted(list(job) for job in itertools.product(*axes))
    for job in jobs:  # each job is a valid config that ablates what it says, on the tiny CPU model
        cfg, plan = load_config(compose_train([f"experiment={experiment}", *job]))
        assert experiment in cfg.tags and cfg.model.n_embd == 128 and plan.total_steps <= 48
        for key, value in (override.split("=") for override in job):
            if key in ("seed", "grad_clip"):
                assert getattr(cfg, key) == float(value)
            elif key == "arch":  # conf/arch/<value>.yaml: its keys land in the model's config
                change = OmegaConf.to_container(OmegaConf.load(CONF / "arch" / f"{value}.yaml"))
                assert all(getattr(cfg.model, k) == v for k, v in change.items())
            elif key.startswith("data.mixture."):  # data.mixture.<source>.weight: a dict entry
                _, _, source, knob = key.split(".")
                assert str(cfg.data.mixture[source][knob]) == value
            elif "." in key:
                group, knob = key.split(".")
                assert str(getattr(getattr(cfg, group), knob)) == value
            else:
                assert getattr(cfg, key).name == value


def test_ablations_keep_the_sweep_group_for_the_sweep():
    """logger.group is left to the sweep (null here), so all jobs of one sweep land in one W&B group."""
    for experiment in ABLATIONS:
        cfg, _ = load_config(compose_train([f"experiment={experiment}", "logger=wandb"]))
        assert cfg.logger.group is None
