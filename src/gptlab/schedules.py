"""Learning-rate schedules: optimizer step -> multiplier of each param group's base LR.

Every option is a pure function of the optimizer step wrapped in LambdaLR, so it works with any optimizer,
and param groups with different base LRs keep their ratio. `step` counts the updates already made: the first
update uses multiplier(0), the last multiplier(total_steps - 1). Schedules are sized from the run's
total_steps (RunPlan.total_steps, derived from the token budget).

Warmup composes the same way for every option except inverse_sqrt, whose rule has its own warmup:

    step <  warmup_steps:  (step + 1) / warmup_steps    linear, reaching 1 on the last warmup step
    step >= warmup_steps:  decay(step - warmup_steps)   the decay clock starts at 0 after warmup

so decay(0) = 1, and the decays that end (cosine, linear, wsd) run over the total_steps - warmup_steps steps
after warmup, reaching min_lr_ratio at step total_steps (just after the last update) and staying there,
as CosineAnnealingLR(T_max=...) and LinearLR(total_iters=...) do.
"""

import math
from collections.abc import Callable

import torch

from gptlab.config import (
    ConstantConfig,
    CosineConfig,
    CosineRestartsConfig,
    ExponentialConfig,
    InverseSqrtConfig,
    LinearConfig,
    SchedulerConfig,
    StepConfig,
    WSDConfig,
)

Multiplier = Callable[[int], float]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, d_model: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step. d_model (the model's width) is used by inverse_sqrt when its own is null."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps, d_model))


def lr_multiplier(cfg: SchedulerConfig, total_steps: int, d_model: int) -> Multiplier:
    if isinstance(cfg, InverseSqrtConfig):
        return inverse_sqrt(cfg.warmup_steps, cfg.d_model or d_model)
    return with_warmup(DECAYS[type(cfg)](cfg, total_steps), cfg.warmup_steps)


def with_warmup(decay: Multiplier, warmup_steps: int) -> Multiplier:
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step - warmup_steps)

    return multiplier


# The decays: (config, total_steps) -> (t = steps since warmup ended -> multiplier).


def cosine(cfg: CosineConfig, total_steps: int) -> Multiplier:
    """Half a cosine from 1 to min_lr_ratio (CosineAnnealingLR, T_max = the steps after warmup)."""
    span = total_steps - cfg.warmup_steps
    return lambda t: _toward(cfg.min_lr_ratio, 0.5 * (1 + math.cos(math.pi * _progress(t, span))))


def linear(cfg: LinearConfig, total_steps: int) -> Multiplier:
    """A straight line from 1 to min_lr_ratio (LinearLR, total_iters = the steps after warmup)."""
    span = total_steps - cfg.warmup_steps
    return lambda t: _toward(cfg.min_lr_ratio, 1 - _progress(t, span))


DECAY_SHAPES: dict[str, Callable[[float], float]] = {  # WSDConfig.decay_shape
    "linear": lambda x: 1 - x,
    "1-sqrt": lambda x: 1 - math.sqrt(x),  # Hägele et al. 2024: better than linear at the same length
}


def wsd(cfg: WSDConfig, total_steps: int) -> Multiplier:
    """Warmup-stable-decay: 1 until the last decay_fraction of the run, then down to min_lr_ratio."""
    decay_steps = cfg.decay_steps(total_steps)
    stable = total_steps - cfg.warmup_steps - decay_steps
    shape = DECAY_SHAPES[cfg.decay_shape]
    return lambda t: 1.0 if t < stable else _toward(cfg.min_lr_ratio, shape(_progress(t - stable, decay_steps)))


def step_decay(cfg: StepConfig, total_steps: int) -> Multiplier:
    """StepLR: times gamma every step_size steps."""
    return lambda t: cfg.gamma ** (t // cfg.step_size)


def exponential(cfg: ExponentialConfig, total_steps: int) -> Multiplier:
    """ExponentialLR: times gamma every step."""
    return lambda t: cfg.gamma**t


def cosine_restarts(cfg: CosineRestartsConfig, total_steps: int) -> Multiplier:
    """SGDR (Loshchilov & Hutter 2017), CosineAnnealingWarmRestarts: cosine cycles of T_0, T_0*T_mult, ... steps,
    each from 1 down towards min_lr_ratio, restarting at 1."""

    def multiplier(t: int) -> float:
        period = cfg.T_0
        if cfg.T_mult == 1:
            t %= period
        while t >= period:
            t -= period
            period *= cfg.T_mult
        return _toward(cfg.min_lr_ratio, 0.5 * (1 + math.cos(math.pi * t / period)))

    return multiplier


def constant(cfg: ConstantConfig, total_steps: int) -> Multiplier:
    return lambda t: 1.0


DECAYS: dict[type, Callable[..., Multiplier]] = {
    CosineConfig: cosine,
    LinearConfig: linear,
    WSDConfig: wsd,
    StepConfig: step_decay,
    ExponentialConfig: exponential,
    CosineRestartsConfig: cosine_restarts,
    ConstantConfig: constant,
}


def inverse_sqrt(warmup_steps: int, d_model: int) -> Multiplier:
    """Vaswani et al. 2017, eq. 3: d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5), step_num = step + 1.

    Exactly that expression, so optimizer.lr scales it and optimizer.lr=1 is the paper's rule: linear growth for
    warmup_steps steps, peaking at (d_model * warmup_steps)^-0.5, then proportional to 1/sqrt(step_num).
    warmup_steps=0: no warmup, d_model^-0.5 * step_num^-0.5 from the first step.
    """

    def multiplier(step: int) -> float:
        n = step + 1
        ramp = n * warmup_steps**-1.5 if warmup_steps else math.inf
        return d_model**-0.5 * min(n**-0.5, ramp)

    return multiplier


def _progress(t: int, span: int) -> float:
    """How far through a decay of `span` steps, in [0, 1]; 1 from step `span` on."""
    return min(t, span) / span if span > 0 else 1.0


def _toward(floor: float, shape: float) -> float:
    """shape 1 -> multiplier 1, shape 0 -> multiplier floor."""
    return floor + (1.0 - floor) * shape
