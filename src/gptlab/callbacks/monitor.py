"""Training dynamics: gradient and weight norms, update-to-data ratios, learning rate, fp16 loss scale, loss
spikes, and the count of updates that were skipped.

An observer: the step itself (gradient norm, non-finite guard, clipping) is GPTModule's, which leaves the
step's numbers on the host in `step_stats` and what became of its update in `step_outcome`; this adds them to
the step's line (`step_metrics`, callbacks/step_log.py).
Weight statistics of a measuring step (every_n_steps) are computed right after its update, from a copy of the
weights taken just before it.

Lightning's LearningRateMonitor is not used for `lr`: it logs `lr-<Optimizer>` at the step count before the
update, one step left of the train/loss that learning rate produced on gptlab's step axis.
"""

import math
import statistics
from collections import deque

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from gptlab.callbacks.config import MonitorConfig
from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.distributed import full_tensor

COUNTED_OUTCOMES = {"overflow": "skipped_steps", "nan_skipped": "nan_skipped"}  # GPTModule.step_outcome -> count


class TrainingMonitor(OnOptimizerStepEnd):
    def __init__(self, cfg: MonitorConfig, on_nan: str):
        self.cfg, self.on_nan = cfg, on_nan
        self.losses: deque[float] = deque(maxlen=cfg.loss_spike.window)  # recent finite train losses
        self.counts = {"skipped_steps": 0, "nan_skipped": 0, "loss_spikes": 0}
        self._before: dict | None = None  # the weights before a measuring step's update (for update_ratio)
        self._lrs: dict = {}  # learning rate by parameter group, as this step's update used it

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step + 1  # the step this update completes, as the loggers count
        self._lrs = {group.get("name", i): group["lr"] for i, group in enumerate(optimizer.param_groups)}  # this step's
        if self.cfg.update_ratio and step % self.cfg.every_n_steps == 0:
            self._before = snapshot(pl_module.model)

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        stats = pl_module.step_stats
        if pl_module.step_outcome in COUNTED_OUTCOMES:
            self.counts[COUNTED_OUTCOMES[pl_module.step_outcome]] += 1
        self.check_loss_spike(step, stats["loss"])
        self._log_step(pl_module, stats)
        if (self.cfg.param_norm or self.cfg.update_ratio) and step % self.cfg.every_n_steps == 0:
            self._log_weight_stats(trainer, step, self._weight_stats(pl_module.model, self._before))
            self._before = None

    def check_loss_spike(self, step: int, loss: float) -> bool:
        """Is `loss` more than k standard deviations above the mean of the window? Warns and counts if so."""
        s = self.cfg.loss_spike
        if not s.enabled or not math.isfinite(loss):
            return False
        spike = False
        if len(self.losses) >= s.min_steps:
            mean = statistics.fmean(self.losses)
            std = statistics.pstdev(self.losses, mean)
            spike = loss > mean + s.k * std
            if spike:
                self.counts["loss_spikes"] += 1
                sigmas = (loss - mean) / std if std > 0 else math.inf
                rank_zero_warn(
                    f"loss spike at step {step}: train loss {loss:.4f} is {sigmas:.1f} standard deviations above "
                    f"the mean {mean:.4f} of the last {len(self.losses)} steps"
                )
        self.losses.append(loss)
        return spike

    def _log_step(self, pl_module, host: dict[str, float]) -> None:
        def log(name: str, value: float) -> None:
            pl_module.step_metrics[name] = float(value)

        if self.cfg.grad_norm:
            log("grad_norm", host["grad_norm"])
        if self.cfg.lr:  # as the update used it (the schedule has moved on by now)
            log("lr", next(iter(self._lrs.values())))
            if len(set(self._lrs.values())) > 1:  # e.g. Muon and AdamW groups
                for name, lr in self._lrs.items():
                    log(f"lr/{name}", lr)
        if "loss_scale" in host and self.cfg.loss_scale:
            log("loss_scale", host["loss_scale"])
            log("skipped_steps", self.counts["skipped_steps"])
        if self.on_nan == "skip":
            log("nan_skipped", self.counts["nan_skipped"])
        if self.cfg.loss_spike.enabled:
            log("loss_spikes", self.counts["loss_spikes"])

    def _weight_stats(self, model: nn.Module, before: dict | None) -> dict[str, torch.Tensor]:
        """param_norm and the update ratios of the update that turned `before` into the weights now."""
        stats = {}
        if self.cfg.param_norm:
            stats["param_norm"] = torch.stack([_norm(p) for p in model.parameters()]).norm()
        if before is not None:
            stats |= update_ratios(layers(model), before)
        return stats

    @staticmethod
    def _log_weight_stats(trainer, step: int, stats: dict[str, torch.Tensor]) -> None:
        # Straight to the loggers, every every_n_steps (self.log would log them on log_every_n_steps only).
        metrics = dict(zip(stats, torch.stack(list(stats.values())).tolist())) if stats else {}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.losses.extend(state_dict["losses"])
        self.counts.update(state_dict["counts"])


def layers(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped by the module that holds them, named by its path: h.0.attn.c_attn, wte, ln_f, ..."""
    grouped: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # tied weights once
        layer = name.rpartition(".")[0].removeprefix("transformer.")
        grouped.setdefault(layer, []).append(p)
    return grouped


def snapshot(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """A copy of the weights, by layer, taken before an update."""
    return {name: [p.detach().clone() for p in params] for name, params in layers(model).items()}


def update_ratios(now: dict[str, list[nn.Parameter]], before: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """|theta_now - theta_before| / |theta_before| per layer (norms over all of a layer's parameters), over
    all parameters (global), and the largest layer's (max). Around 1e-3 is healthy for Adam-type training."""
    sq_delta = {n: sum(_norm(p.detach() - b) ** 2 for p, b in zip(now[n], before[n])) for n in now}
    sq_weight = {n: sum(_norm(b) ** 2 for b in before[n]) for n in now}
    tiny = torch.finfo(torch.float32).tiny  # an all-zero layer: ratio 0 while it stays zero
    ratios = {f"update_ratio/{n}": (sq_delta[n] / sq_weight[n].clamp_min(tiny)).sqrt() for n in now}
    ratios["update_ratio/max"] = torch.stack(list(ratios.values())).max()
    ratios["update_ratio/global"] = (sum(sq_delta.values()) / sum(sq_weight.values()).clamp_min(tiny)).sqrt()
    return ratios


def _norm(t: torch.Tensor) -> torch.Tensor:
    return full_tensor(torch.linalg.vector_norm(t.detach(), dtype=torch.float32))  # fp32 accumulation, also for bf16
