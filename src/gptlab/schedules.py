"""The `scheduler` group: learning-rate schedules, optimizer step -> multiplier of each param group's base LR.

Each option is a config class below whose `decay` is a pure function of the optimizer step, wrapped in LambdaLR,
so it works with any optimizer, and param groups with different base LRs keep their ratio. `step` counts the
updates already made: the first update uses multiplier(0), the last multiplier(total_steps - 1). Schedules are
sized from the run's total_steps (RunPlan.total_steps, derived from the budget).

Warmup composes the same way for every option except inverse_sqrt, whose rule has its own warmup:

    step <  warmup_steps:  (step + 1) / warmup_steps    linear, reaching 1 on the last warmup step
    step >= warmup_steps:  decay(step - warmup_steps)   the decay clock starts at 0 after warmup

so decay(0) = 1, and the decays that end (cosine, linear, wsd) run over the total_steps - warmup_steps steps
after warmup, reaching min_lr_ratio at step total_steps (just after the last update) and staying there,
as CosineAnnealingLR(T_max=...) and LinearLR(total_iters=...) do.

A new schedule is one class here (its knobs, their rules, its decay) and its conf/scheduler/<name>.yaml.
torch is imported only by build_scheduler: these configs are read before torch loads.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from omegaconf import MISSING

from gptlab.schema import at_least, in_range, knob, non_negative, one_of, option, optional

if TYPE_CHECKING:
    import torch

Multiplier = Callable[[int], float]
ratio = in_range(0, 1)  # of optimizer.lr
factor = in_range(0, 1, "(]")  # of the LR, per step or per drop


@dataclass
class ScheduleConfig:
    """What every option has: a linear warmup, then the option's decay."""

    name: str = MISSING  # the option (conf/scheduler/<name>.yaml)
    # step s < warmup_steps uses lr x (s+1)/warmup_steps; 0: no warmup; capped at the run's length (see warmup)
    warmup_steps: int = knob(8, non_negative)

    def warmup(self, total_steps: int) -> int:
        """The warmup in a run of total_steps: warmup_steps, or the whole run where that is shorter, so that any
        budget of one step or more runs (the run's header says when the cap applies)."""
        return min(self.warmup_steps, total_steps)

    def decay(self, total_steps: int) -> Multiplier:
        """t = steps since warmup ended -> multiplier, 1 at t = 0."""
        raise NotImplementedError

    def multiplier(self, total_steps: int, d_model: int) -> Multiplier:
        """The whole schedule; d_model (the model's width) is for inverse_sqrt."""
        return with_warmup(self.decay(total_steps), self.warmup(total_steps))


@option("scheduler")
@dataclass
class CosineConfig(ScheduleConfig):
    """Linear warmup, then half a cosine down to min_lr_ratio x optimizer.lr at the end of the run
    (CosineAnnealingLR, T_max = the steps after warmup)."""

    name: str = "cosine"
    min_lr_ratio: float = knob(0.1, ratio)  # the LR ends at min_lr = min_lr_ratio x optimizer.lr

    def decay(self, total_steps: int) -> Multiplier:
        span = total_steps - self.warmup(total_steps)
        return lambda t: _toward(self.min_lr_ratio, 0.5 * (1 + math.cos(math.pi * _progress(t, span))))


@option("scheduler")
@dataclass
class LinearConfig(ScheduleConfig):
    """Linear warmup, then a straight line down to min_lr_ratio x optimizer.lr (LinearLR, total_iters = the steps
    after warmup)."""

    name: str = "linear"
    min_lr_ratio: float = knob(0.0, ratio)  # the LR ends at min_lr = min_lr_ratio x optimizer.lr

    def decay(self, total_steps: int) -> Multiplier:
        span = total_steps - self.warmup(total_steps)
        return lambda t: _toward(self.min_lr_ratio, 1 - _progress(t, span))


DECAY_SHAPES: dict[str, Callable[[float], float]] = {  # WSDConfig.decay_shape
    "linear": lambda x: 1 - x,
    "1-sqrt": lambda x: 1 - math.sqrt(x),  # Hägele et al. 2024: better than linear at the same length
}


@option("scheduler")
@dataclass
class WSDConfig(ScheduleConfig):
    """Warmup-stable-decay (Hu et al. 2024 MiniCPM; Hägele et al. 2024): warmup, optimizer.lr held, then the last
    decay_fraction of the run decays to min_lr_ratio x optimizer.lr."""

    name: str = "wsd"
    decay_fraction: float = knob(0.2, in_range(0, 1, "(]"))  # share of the run's steps in the final decay
    decay_shape: str = knob("linear", one_of(*DECAY_SHAPES))  # linear | 1-sqrt (1 - sqrt(progress), Hägele et al. 2024)
    min_lr_ratio: float = knob(0.0, ratio)  # the LR ends at min_lr = min_lr_ratio x optimizer.lr

    def decay_steps(self, total_steps: int) -> int:
        return max(1, round(self.decay_fraction * total_steps))

    def warmup(self, total_steps: int) -> int:
        """Capped so as to end where the decay begins."""
        return min(self.warmup_steps, total_steps - self.decay_steps(total_steps))

    def decay(self, total_steps: int) -> Multiplier:
        decay_steps = self.decay_steps(total_steps)
        stable = total_steps - self.warmup(total_steps) - decay_steps
        shape = DECAY_SHAPES[self.decay_shape]
        return lambda t: 1.0 if t < stable else _toward(self.min_lr_ratio, shape(_progress(t - stable, decay_steps)))


@option("scheduler")
@dataclass
class InverseSqrtConfig(ScheduleConfig):
    """"Attention Is All You Need" (Vaswani et al. 2017), eq. 3: d_model^-0.5 * min(n^-0.5, n * warmup_steps^-1.5),
    n = step + 1. Exactly that expression, so optimizer.lr scales it and optimizer.lr=1 is the paper's rule (there
    warmup_steps=4000): linear growth for warmup_steps steps, peaking at (d_model * warmup_steps)^-0.5, then
    proportional to 1/sqrt(n). warmup_steps=0: no warmup, d_model^-0.5 * n^-0.5 from the first step. The rule's
    warmup_steps is not capped at the run's length: it sets the rule's peak too."""

    name: str = "inverse_sqrt"
    d_model: Optional[int] = knob(None, optional(at_least(1)))  # the d_model of the rule; null: model.n_embd

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps

    def multiplier(self, total_steps: int, d_model: int) -> Multiplier:
        d_model, warmup = self.d_model or d_model, self.warmup_steps

        def multiplier(step: int) -> float:
            n = step + 1
            ramp = n * warmup**-1.5 if warmup else math.inf
            return d_model**-0.5 * min(n**-0.5, ramp)

        return multiplier


@option("scheduler")
@dataclass
class StepConfig(ScheduleConfig):
    """StepLR: after warmup, multiply the LR by gamma every step_size optimizer steps."""

    name: str = "step"
    step_size: int = knob(16, at_least(1))  # optimizer steps between drops
    gamma: float = knob(0.5, factor)  # factor per drop

    def decay(self, total_steps: int) -> Multiplier:
        return lambda t: self.gamma ** (t // self.step_size)


@option("scheduler")
@dataclass
class ExponentialConfig(ScheduleConfig):
    """ExponentialLR: after warmup, multiply the LR by gamma every optimizer step."""

    name: str = "exponential"
    gamma: float = knob(0.95, factor)  # factor per optimizer step

    def decay(self, total_steps: int) -> Multiplier:
        return lambda t: self.gamma**t


@option("scheduler")
@dataclass
class CosineRestartsConfig(ScheduleConfig):
    """SGDR (Loshchilov & Hutter 2017), torch's CosineAnnealingWarmRestarts: after warmup, cosine cycles of T_0,
    T_0*T_mult, ... steps, each from optimizer.lr down towards min_lr_ratio x optimizer.lr, restarting at the top."""

    name: str = "cosine_restarts"
    T_0: int = knob(10, at_least(1))  # optimizer steps in the first cycle
    T_mult: int = knob(2, at_least(1))  # each cycle is T_mult times longer than the one before
    min_lr_ratio: float = knob(0.0, ratio)  # eta_min = min_lr_ratio x optimizer.lr

    def decay(self, total_steps: int) -> Multiplier:
        def multiplier(t: int) -> float:
            period = self.T_0
            if self.T_mult == 1:
                t %= period
            while t >= period:
                t -= period
                period *= self.T_mult
            return _toward(self.min_lr_ratio, 0.5 * (1 + math.cos(math.pi * t / period)))

        return multiplier


@option("scheduler")
@dataclass
class ConstantConfig(ScheduleConfig):
    """optimizer.lr throughout, after an optional linear warmup."""

    name: str = "constant"
    warmup_steps: int = knob(0, non_negative)

    def decay(self, total_steps: int) -> Multiplier:
        return lambda t: 1.0


def build_scheduler(
    optimizer: "torch.optim.Optimizer", cfg: ScheduleConfig, total_steps: int, d_model: int
) -> "torch.optim.lr_scheduler.LambdaLR":
    """Stepped once per optimizer step. d_model (the model's width) is used by inverse_sqrt when its own is null."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cfg.multiplier(total_steps, d_model))


def with_warmup(decay: Multiplier, warmup_steps: int) -> Multiplier:
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step - warmup_steps)

    return multiplier


def _progress(t: int, span: int) -> float:
    """How far through a decay of `span` steps, in [0, 1]; 1 from step `span` on."""
    return min(t, span) / span if span > 0 else 1.0


def _toward(floor: float, shape: float) -> float:
    """shape 1 -> multiplier 1, shape 0 -> multiplier floor."""
    return floor + (1.0 - floor) * shape
