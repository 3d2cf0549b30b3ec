"""Every option of every config group composes and validates; each kind of user mistake is stopped early."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from gptlab.config import ConfigError, load_config
from tests.conftest import CONF, ROOT, compose_train

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_the_six_ablation_groups_and_plumbing_exist():
    expected = {"model", "optimizer", "scheduler", "precision", "data", "distributed"}
    expected |= {"trainer", "logger", "callbacks", "eval", "paths"}
    assert expected <= set(GROUPS)
    assert {"gpt2_tiny", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m"} <= {o for g, o in OPTIONS if g == "model"}
    assert {"fp32", "tf32", "bf16", "fp16"} <= {o for g, o in OPTIONS if g == "precision"}
    assert {"wandb", "none"} <= {o for g, o in OPTIONS if g == "logger"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    needs = {"local": ["data.source=/my/documents"]}  # options with a required value the user supplies
    cfg, plan = load_config(compose_train([f"{group}={option}", *needs.get(option, [])]))
    assert plan.total_steps >= 1 and plan.grad_accum >= 1
    assert plan.tokens_per_step == cfg.global_batch_tokens


def test_default_plan_is_derived_from_tokens():
    cfg, plan = load_config(compose_train())
    assert plan.grad_accum == cfg.global_batch_tokens // (cfg.data.micro_batch_size * cfg.data.seq_len)
    assert plan.total_steps == cfg.max_tokens // cfg.global_batch_tokens
    cfg, plan = load_config(compose_train(["max_tokens=null", "trainer.max_steps=70"]))
    assert plan.total_steps == 70


def test_seed_zero_is_kept():
    cfg, _ = load_config(compose_train(["seed=0"]))
    assert cfg.seed == 0


def test_precision_options_map_to_lightning_flags():
    flags = {name: load_config(compose_train([f"precision={name}"]))[0].precision for name in ("fp32", "tf32", "bf16", "fp16")}
    assert flags["fp32"].trainer_precision == "32-true" and flags["fp32"].matmul_precision == "highest"
    assert flags["tf32"].trainer_precision == "32-true" and flags["tf32"].matmul_precision == "high"
    assert flags["bf16"].trainer_precision == "bf16-mixed"
    assert flags["fp16"].trainer_precision == "16-mixed"


# (overrides, the key the error must name)
BAD_CONFIGS = {
    "wrong_type": (["optimizer.lr=abc"], "optimizer.lr"),
    "wrong_type_int": (["model.n_layer=1.5"], "model.n_layer"),
    "unknown_option": (["logger.mode=sometimes"], "logger.mode"),
    "unknown_key": (["+optimizer.momentum=0.9"], "optimizer.momentum"),
    "unknown_key_without_plus": (["optimizer.momentum=0.9"], "optimizer.momentum"),
    "unknown_top_level_key": (["max_token=100"], "max_token"),
    "option_renamed_instead_of_picked": (["optimizer.name=sgd"], "optimizer.name"),
    "heads_do_not_divide_width": (["model.n_head=3"], "model.n_embd"),
    "seq_len_above_block_size": (["data.seq_len=512", "data.micro_batch_size=1", "global_batch_tokens=4096"], "data.seq_len"),
    "global_batch_not_divisible": (["global_batch_tokens=1000"], "global_batch_tokens"),
    "non_positive_lr": (["optimizer.lr=0"], "optimizer.lr"),
    "negative_lr": (["optimizer.lr=-1e-3"], "optimizer.lr"),
    "missing_resume_checkpoint": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
    "two_budgets_on_the_command_line": (["max_tokens=8192", "trainer.max_steps=5"], "trainer.max_steps"),
    "no_budget": (["max_tokens=null"], "max_tokens"),
}
# Found by Hydra while composing, before the task runs: one line and status 2, and no run folder at all.
COMPOSITION_ERRORS = {"wrong_type", "wrong_type_int", "unknown_key_without_plus", "unknown_top_level_key"}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_names_the_key(case, tmp_path):
    from gptlab.resume import find_resume

    overrides, key = BAD_CONFIGS[case]
    with pytest.raises(ConfigError) as err:
        cfg, _ = load_config(compose_train(overrides), command_line=overrides)
        find_resume(cfg, tmp_path)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")


def test_error_message_says_what_is_allowed():
    with pytest.raises(ConfigError, match="offline, online, disabled"):
        load_config(compose_train(["logger.mode=sometimes"]))
    with pytest.raises(ConfigError, match=r"8 x 256 x 1 = 2048"):
        load_config(compose_train(["global_batch_tokens=1000"]))
    with pytest.raises(ConfigError, match="unknown key; known: name, lr, weight_decay"):
        load_config(compose_train(["+optimizer.momentum=0.9"]))
    with pytest.raises(ConfigError, match="unknown key; known: name, lr, weight_decay"):
        load_config(compose_train(["optimizer.momentum=0.9"]))


def test_unknown_group_option_name_is_rejected():
    cfg = OmegaConf.to_container(compose_train(), resolve=False)
    cfg["optimizer"]["name"] = "adamax"
    with pytest.raises(ConfigError, match="optimizer.name: unknown option 'adamax'; choose one of: adam, adamw"):
        load_config(cfg)


@pytest.mark.slow
def test_bad_input_exits_early_from_the_entry_point(tmp_path, data_dir):
    """The real script: non-zero exit, one message naming the key, no traceback, no checkpoint."""
    damaged = tmp_path / "damaged_data"
    shutil.copytree(data_dir, damaged)
    shard = damaged / "sample" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    cases = {
        **BAD_CONFIGS,
        "unknown_group_option": (["model=gpt2_huge"], "model/gpt2_huge"),
        "damaged_shard": ([f"paths.data_dir={damaged}"], "Data error: "),
    }
    env = {**os.environ, "WANDB_MODE": "offline"}
    procs = {}
    for case, (overrides, _) in cases.items():
        cmd = [sys.executable, str(ROOT / "scripts/train.py"), *overrides, f"hydra.run.dir={tmp_path / case}"]
        procs[case] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for case, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        key = cases[case][1]
        assert proc.returncode != 0, case
        assert key in stderr, (case, stderr)
        assert "Traceback" not in stderr, (case, stderr)
        run_dir = tmp_path / case
        assert not list(run_dir.rglob("*.ckpt")), case
        if case in COMPOSITION_ERRORS:
            assert proc.returncode == 2 and stderr.startswith(f"Config error: {key}:"), (case, stderr)
            assert len(stderr.strip().splitlines()) == 1 and not run_dir.exists(), (case, stderr)
        elif case in BAD_CONFIGS:
            assert proc.returncode == 2 and f"Config error: {key}:" in stderr, (case, stderr)
            assert json.loads((run_dir / "summary.json").read_text())["status"] == "config_error"
            assert not (run_dir / "wandb").exists()  # stopped before any logger or model was built
        elif case == "damaged_shard":
            assert proc.returncode == 2 and "header promises" in stderr, stderr
            assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
        else:  # an unknown option, found by Hydra
            assert proc.returncode == 2 and stderr.startswith("Config error: model: unknown option 'gpt2_huge'")
            assert "gpt2_124m" in stderr and not run_dir.exists(), stderr


def test_data_dir_follows_gptlab_data_dir(monkeypatch):
    """Shared cluster storage: one environment variable moves every dataset."""
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("GPTLAB_DATA_DIR", "/shared/datasets")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=["data=fineweb_edu", "paths.output_dir=/tmp/run"])
    assert load_config(cfg)[0].data.dir == "/shared/datasets/fineweb_edu_sample-10BT"


# --- one budget -----------------------------------------------------------------------------------------------


def budget(overrides: list[str], command_line: list[str] | None = None):
    """The run plan of `python scripts/train.py <overrides>` (command_line: what of it the user typed)."""
    return load_config(compose_train(overrides), command_line=overrides if command_line is None else command_line)


def test_a_budget_key_on_the_command_line_is_the_budget():
    cfg, plan = budget(["trainer.max_steps=5", "scheduler.warmup_steps=2"])
    assert plan.total_steps == 5 and plan.budget == "trainer.max_steps=5 (command line)"
    assert cfg.max_tokens is None and cfg.trainer.max_steps == 5  # the other key is null in the run's config
    cfg, plan = budget(["max_tokens=8192", "scheduler.warmup_steps=1"])
    assert plan.total_steps == 2 and plan.budget == "max_tokens=8192 (command line)" and cfg.trainer.max_steps is None
    cfg, plan = budget([])
    assert plan.total_steps == 48 and plan.budget == "max_tokens=196608 (config)"
    # over a preset's budget of the other kind: the command line wins
    assert budget(["experiment=cpu_ablation", "trainer.max_steps=5", "scheduler.warmup_steps=1"])[1].total_steps == 5
    _, plan = budget(["debug=overfit", "max_tokens=8192"])  # debug=overfit caps at trainer.max_steps=500; no warmup
    assert plan.total_steps == 4 and plan.budget == "max_tokens=8192 (command line)"
    # the old spelling still works
    assert budget(["max_tokens=null", "trainer.max_steps=70"])[1].total_steps == 70


def test_a_budget_is_never_silently_ignored():
    with pytest.raises(ConfigError, match=r"trainer.max_steps: and max_tokens both set a budget in the config"):
        budget(["trainer.max_steps=5"], command_line=[])  # e.g. a preset that sets one and not the other's null
    with pytest.raises(ConfigError, match=r"trainer.max_steps: and max_tokens are both on the command line"):
        budget(["trainer.max_steps=5", "max_tokens=8192"])
    with pytest.raises(ConfigError, match=r"max_tokens: no budget: set max_tokens=<tokens> or trainer.max_steps"):
        budget(["max_tokens=null"])
    # a budget shorter than the default warmup runs: the warmup is capped at the run's length
    cfg, plan = budget(["trainer.max_steps=5"])
    assert plan.total_steps == 5 and cfg.scheduler.warmup(plan.total_steps) == 5 < cfg.scheduler.warmup_steps


@pytest.mark.slow
def test_trainer_max_steps_on_the_command_line_trains_that_many_steps(tmp_path, data_dir):
    """The README's `trainer.max_steps=N` runs N steps (it used to run the default 48), and the header says why."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), "debug=smoke", "trainer.max_steps=3", "logger=none",
           f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "budget     3 steps = 1,536 tokens, set by trainer.max_steps=3 (command line)" in proc.stdout
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 3  # debug=smoke's max_tokens says 2


# --- checked before torch and Lightning load -----------------------------------------------------------------

PROBE = """
import runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    print(e.code, "torch" in sys.modules, "lightning" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.parametrize("override", ["optimizer.foo=1", "+optimizer.foo=1", "optimizer.lr=abc", "optimizer.lr=-1"])
def test_config_errors_come_before_torch_and_lightning_load(tmp_path, override):
    """Hydra's composition errors and gptlab's rules alike: status 2, one line, neither torch nor Lightning imported."""
    probe = PROBE.format(script=str(ROOT / "scripts" / "train.py"))
    proc = subprocess.run([sys.executable, "-c", probe, override, f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.stdout.split() == ["2", "False", "False"], (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("Config error: optimizer.")
