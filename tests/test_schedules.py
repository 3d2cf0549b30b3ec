"""Learning-rate schedules: closed forms, PyTorch's own schedulers, warmup, param groups, config errors,
the plot script, and what the trainer actually uses."""

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from gptlab.config import load_config
from gptlab.errors import ConfigError
from gptlab.schedules import (
    ConstantConfig,
    CosineConfig,
    CosineRestartsConfig,
    ExponentialConfig,
    InverseSqrtConfig,
    LinearConfig,
    StepConfig,
    WSDConfig,
    build_scheduler,
)
from tests.conftest import CONF, ROOT, compose_train

OPTIONS = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))


def multipliers(cfg, total_steps: int, steps, d_model: int = 64) -> list[float]:
    f = cfg.multiplier(total_steps, d_model)
    return [f(s) for s in steps]


def lr_sequence(scheduler, optimizer, n: int, group: int = 0) -> list[float]:
    """The LR of the first n optimizer steps, stepping as Lightning does (interval="step")."""
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[group]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def sgd(lrs=(1e-3,)) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": lr} for lr in lrs])


# --- closed forms -------------------------------------------------------------------------------------------


def test_cosine_closed_form():
    f = CosineConfig(warmup_steps=10, min_lr_ratio=0.1).multiplier(total_steps=110, d_model=64)
    assert [f(s) for s in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_linear_closed_form():
    got = multipliers(LinearConfig(warmup_steps=4, min_lr_ratio=0.1), 24, (0, 3, 4, 9, 14, 24, 30))
    assert got == pytest.approx([0.25, 1.0, 1.0, 1 - 0.9 * 0.25, 1 - 0.9 * 0.5, 0.1, 0.1])


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_closed_form(shape):
    """100 steps, 5 of warmup, the last 20% (steps 80..99) decay from 1 to 0.1, stable in between."""
    decay = {"linear": lambda x: 1 - x, "1-sqrt": lambda x: 1 - math.sqrt(x)}[shape]
    cfg = WSDConfig(warmup_steps=5, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.1)
    got = multipliers(cfg, 100, (0, 4, 5, 50, 79, 80, 85, 90, 99, 100, 120))
    want = [0.2, 1.0, 1.0, 1.0, 1.0, 1.0] + [0.1 + 0.9 * decay(k / 20) for k in (5, 10, 19)] + [0.1, 0.1]
    assert got == pytest.approx(want)


def test_wsd_decay_is_the_last_fraction_of_the_run_whatever_the_warmup():
    for warmup in (0, 7, 30):
        f = WSDConfig(warmup_steps=warmup, decay_fraction=0.25, min_lr_ratio=0.0).multiplier(40, 64)
        assert f(29) == 1.0 and f(30) == 1.0 and f(31) == pytest.approx(0.9), warmup  # decay steps 30..39


def test_inverse_sqrt_is_the_papers_rule():
    """Vaswani et al. eq. 3 with d_model=512, warmup_steps=4000 (step_num = step + 1)."""
    f = InverseSqrtConfig(warmup_steps=4000, d_model=512).multiplier(total_steps=100_000, d_model=64)
    assert f(0) == pytest.approx(512**-0.5 * 1 * 4000**-1.5)
    assert f(1999) == pytest.approx(512**-0.5 * 2000 * 4000**-1.5)
    assert f(3999) == pytest.approx(512**-0.5 * 4000**-0.5)  # the peak, where both terms meet
    assert f(3999) == pytest.approx(6.987712429686844e-4)
    assert f(15999) == pytest.approx(512**-0.5 * 16000**-0.5)
    assert max(multipliers(InverseSqrtConfig(warmup_steps=4000, d_model=512), 0, range(0, 20_000, 7))) <= f(3999)


def test_inverse_sqrt_d_model_defaults_to_the_model_width_and_warmup_zero_means_none():
    f = InverseSqrtConfig(warmup_steps=0, d_model=None).multiplier(total_steps=50, d_model=128)
    assert [f(s) for s in (0, 3, 99)] == pytest.approx([128**-0.5, 128**-0.5 / 2, 128**-0.5 / 10])


def test_step_exponential_restarts_and_constant_closed_forms():
    step = StepConfig(warmup_steps=2, step_size=3, gamma=0.5)
    assert multipliers(step, 30, (0, 1, 2, 4, 5, 7, 8, 11)) == pytest.approx([0.5, 1, 1, 1, 0.5, 0.5, 0.25, 0.125])
    exp = ExponentialConfig(warmup_steps=3, gamma=0.9)
    assert multipliers(exp, 30, (2, 3, 8, 13)) == pytest.approx([1.0, 1.0, 0.9**5, 0.9**10])
    sgdr = CosineRestartsConfig(warmup_steps=0, T_0=4, T_mult=2, min_lr_ratio=0.2)
    cos = lambda t, period: 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t / period))  # noqa: E731
    got = multipliers(sgdr, 100, (0, 2, 3, 4, 8, 11, 12, 13, 28))
    assert got == pytest.approx([1.0, 0.6, cos(3, 4), 1.0, 0.6, cos(7, 8), 1.0, cos(1, 16), 1.0])  # cycles 4, 8, 16
    flat = CosineRestartsConfig(warmup_steps=0, T_0=4, T_mult=1, min_lr_ratio=0.0)
    assert multipliers(flat, 100, (4, 9, 42)) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5])
    constant = multipliers(ConstantConfig(warmup_steps=4), 30, (0, 1, 3, 4, 29, 99))
    assert constant == pytest.approx([0.25, 0.5, 1, 1, 1, 1])
    assert multipliers(ConstantConfig(warmup_steps=0), 30, (0, 29)) == [1.0, 1.0]


# --- against PyTorch's own schedulers ----------------------------------------------------------------------

TOTAL = 40


def torch_twin(cfg, optimizer, lr: float):
    """PyTorch's scheduler for the part of `cfg` after warmup, and for how many steps it agrees with ours."""
    span = TOTAL - cfg.warmup_steps
    if isinstance(cfg, CosineConfig):
        return tls.CosineAnnealingLR(optimizer, T_max=span, eta_min=cfg.min_lr_ratio * lr), TOTAL + 1
    if isinstance(cfg, LinearConfig):
        return tls.LinearLR(optimizer, 1.0, cfg.min_lr_ratio, total_iters=span), TOTAL + 20
    if isinstance(cfg, StepConfig):
        return tls.StepLR(optimizer, cfg.step_size, cfg.gamma), TOTAL + 20
    if isinstance(cfg, ExponentialConfig):
        return tls.ExponentialLR(optimizer, cfg.gamma), TOTAL + 20
    if isinstance(cfg, CosineRestartsConfig):
        eta_min = cfg.min_lr_ratio * lr
        return tls.CosineAnnealingWarmRestarts(optimizer, cfg.T_0, cfg.T_mult, eta_min), TOTAL + 50
    raise AssertionError(cfg)


TWINS = [
    CosineConfig(min_lr_ratio=0.1),
    CosineConfig(min_lr_ratio=0.0),
    LinearConfig(min_lr_ratio=0.0),
    LinearConfig(min_lr_ratio=0.25),
    StepConfig(step_size=7, gamma=0.3),
    ExponentialConfig(gamma=0.93),
    CosineRestartsConfig(T_0=5, T_mult=1, min_lr_ratio=0.1),
    CosineRestartsConfig(T_0=3, T_mult=2, min_lr_ratio=0.0),
    CosineRestartsConfig(T_0=2, T_mult=3, min_lr_ratio=0.5),
]


@pytest.mark.parametrize("warmup", [0, 6])
@pytest.mark.parametrize("cfg", TWINS, ids=lambda c: f"{c.name}-{'-'.join(map(str, dataclasses.astuple(c)[2:]))}")
def test_lr_sequence_equals_pytorchs_scheduler(cfg, warmup):
    """With warmup, the twin is SequentialLR(LinearLR warmup, the decay): the decay clock starts after warmup."""
    cfg = dataclasses.replace(cfg, warmup_steps=warmup)
    lr = 0.02
    ours = sgd([lr])
    theirs = sgd([lr])
    decay, n = torch_twin(cfg, theirs, lr)
    if warmup:
        ramp = tls.LinearLR(theirs, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
        decay = tls.SequentialLR(theirs, [ramp, decay], milestones=[warmup])
    got = lr_sequence(build_scheduler(ours, cfg, TOTAL, d_model=64), ours, n)
    want = lr_sequence(decay, theirs, n)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "inverse_sqrt"])
def test_warmup_composes_before_the_schedule(option):
    """Warmup ramps (s+1)/W, then the schedule runs as if the run began after warmup (wsd: see its own test)."""
    cfg = load_config(compose_train([f"scheduler={option}", "max_tokens=null", "trainer.max_steps=60"]))[0].scheduler
    warm, cold = dataclasses.replace(cfg, warmup_steps=10), dataclasses.replace(cfg, warmup_steps=0)
    with_warmup = multipliers(warm, 60, range(70))
    assert with_warmup[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    if option != "wsd":  # wsd's decay is the last fraction of the whole run
        assert with_warmup[10:] == pytest.approx(multipliers(cold, 50, range(60)))


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_keeps_the_ratio_of_param_groups(option):
    cfg, plan = load_config(compose_train([f"scheduler={option}"]))
    optimizer = sgd([1e-3, 3e-2])
    scheduler = build_scheduler(optimizer, cfg.scheduler, plan.total_steps, cfg.model.n_embd)
    f = cfg.scheduler.multiplier(plan.total_steps, cfg.model.n_embd)
    for step in range(plan.total_steps):
        small, large = (g["lr"] for g in optimizer.param_groups)
        assert small == pytest.approx(1e-3 * f(step), rel=1e-12) and large == pytest.approx(30 * small, rel=1e-12)
        optimizer.step()
        scheduler.step()


# --- config --------------------------------------------------------------------------------------------------

# (overrides on the default 48-step run, the key the error must name)
BAD = {
    "warmup_negative": (["scheduler=linear", "scheduler.warmup_steps=-1"], "scheduler.warmup_steps"),
    "min_lr_ratio_above_1": (["scheduler=linear", "scheduler.min_lr_ratio=1.5"], "scheduler.min_lr_ratio"),
    "min_lr_ratio_negative": (["scheduler=cosine_restarts", "scheduler.min_lr_ratio=-0.1"], "scheduler.min_lr_ratio"),
    "decay_fraction_zero": (["scheduler=wsd", "scheduler.decay_fraction=0"], "scheduler.decay_fraction"),
    "decay_fraction_above_1": (["scheduler=wsd", "scheduler.decay_fraction=1.5"], "scheduler.decay_fraction"),
    "decay_shape": (["scheduler=wsd", "scheduler.decay_shape=cubic"], "scheduler.decay_shape"),
    "d_model_zero": (["scheduler=inverse_sqrt", "scheduler.d_model=0"], "scheduler.d_model"),
    "step_size_zero": (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size"),
    "step_gamma_zero": (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma"),
    "exponential_gamma_above_1": (["scheduler=exponential", "scheduler.gamma=1.01"], "scheduler.gamma"),
    "T_0_zero": (["scheduler=cosine_restarts", "scheduler.T_0=0"], "scheduler.T_0"),
    "T_mult_zero": (["scheduler=cosine_restarts", "scheduler.T_mult=0"], "scheduler.T_mult"),
    "T_mult_not_integer": (["scheduler=cosine_restarts", "scheduler.T_mult=1.5"], "scheduler.T_mult"),
    "knob_of_another_option": (["scheduler=constant", "+scheduler.min_lr_ratio=0.1"], "scheduler.min_lr_ratio"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scheduler_config_names_the_key(case):
    overrides, key = BAD[case]
    with pytest.raises(ConfigError) as err:
        load_config(compose_train(overrides))
    assert err.value.key == key and str(err.value).startswith(f"{key}: ")


def test_a_warmup_longer_than_the_run_is_capped_at_the_run():
    """Any budget of one step or more runs on the default warmup: a 4-step run warms up over all 4 steps; wsd's
    warmup ends where its decay begins; inverse_sqrt's warmup_steps is its rule's and stays."""
    ramp = [(s + 1) / 48 for s in range(48)]
    assert multipliers(ConstantConfig(warmup_steps=49), 48, range(48)) == pytest.approx(ramp)
    assert multipliers(CosineConfig(warmup_steps=8), 4, range(4)) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    wsd = WSDConfig(warmup_steps=40, decay_fraction=0.2)  # 10 decay steps of 48: warmup 38
    assert wsd.warmup(48) == 38 and multipliers(wsd, 48, [36, 37, 38]) == pytest.approx([37 / 38, 1.0, 1.0])
    assert InverseSqrtConfig(warmup_steps=4000).warmup(48) == 4000
    cfg, plan = load_config(compose_train(["scheduler=wsd", "max_tokens=4096"]))  # 1 step
    assert plan.total_steps == 1 and cfg.scheduler.warmup(1) == 0


def test_edge_values_are_accepted():
    for overrides in (
        ["scheduler=wsd", "scheduler.warmup_steps=0", "scheduler.decay_fraction=1"],
        ["scheduler=wsd", "scheduler.warmup_steps=38", "scheduler.decay_fraction=0.2"],  # 38 + 10 = 48 steps
        ["scheduler=step", "scheduler.gamma=1"],
        ["scheduler=cosine_restarts", "scheduler.T_0=1", "scheduler.T_mult=1"],
        ["scheduler=constant", "scheduler.warmup_steps=48"],
        ["scheduler=inverse_sqrt", "scheduler.warmup_steps=0", "scheduler.d_model=512"],
    ):
        load_config(compose_train(overrides))


# --- the plot script, and the trainer ------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_schedules_writes_a_png_of_every_option(tmp_path, capsys):
    script = load_script("plot_schedules")
    out = script.main(["--steps", "30", "--out", str(tmp_path / "plots" / "schedules.png")])
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert f"Wrote {len(OPTIONS)} schedules to {out.resolve()}" in capsys.readouterr().out
    lrs, label = script.lr_curve("cosine", 30, ["optimizer.lr=1.0", "scheduler.warmup_steps=0"])
    assert label.startswith("cosine")
    assert lrs == pytest.approx(multipliers(CosineConfig(warmup_steps=0, min_lr_ratio=0.1), 30, range(30)))
    with pytest.raises(SystemExit) as exit_:  # a config mistake: one line, status 2
        script.main(["--steps", "4", "--out", str(tmp_path / "none.png"), "scheduler.warmup_steps=-1"])
    assert exit_.value.code == 2 and "Config error: scheduler.warmup_steps:" in capsys.readouterr().err


def test_inverse_sqrt_uses_the_models_width_in_the_module():
    from gptlab.module import GPTModule

    cfg, plan = load_config(
        compose_train(["scheduler=inverse_sqrt", "scheduler.warmup_steps=4", "model.n_embd=96", "model.n_head=4"])
    )
    module = GPTModule(cfg, plan)
    optim = module.configure_optimizers()
    optimizer, scheduler = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    lr = module.cfg.optimizer.lr
    assert lr_sequence(scheduler, optimizer, 6) == pytest.approx(
        [lr * 96**-0.5 * min(n**-0.5, n * 4**-1.5) for n in range(1, 7)]
    )


def test_the_trainer_uses_the_configured_schedule(tmp_path, data_dir):
    """scheduler=wsd end to end: 4 steps, 2 of warmup, the last half decaying as 1 - sqrt to 0."""
    from gptlab.train import run

    overrides = [
        "debug=smoke", "logger=none", "max_tokens=2048", "model.n_embd=32", "model.n_head=2",
        "eval.every_n_steps=100", "eval.at_start=false", "eval.hellaswag.enabled=false",
        "callbacks.checkpoint.every_n_steps=100",
        "scheduler=wsd", "scheduler.warmup_steps=2", "scheduler.decay_fraction=0.5", "scheduler.decay_shape=1-sqrt",
    ]  # fmt: skip
    config = compose_train(overrides, tmp_path / "run", data_dir)
    lr = load_config(config)[0].optimizer.lr
    summary = run(config)
    assert summary["status"] == "completed" and summary["step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {int(r["step"]): r["lr"] for r in rows if "lr" in r}
    want = [0.5, 1.0, 1.0, 1 - math.sqrt(1 / 2)]  # update k (logged as step k + 1) uses multiplier(k)
    assert [logged[step] for step in range(1, 5)] == pytest.approx([lr * m for m in want])
