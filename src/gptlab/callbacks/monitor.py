"""Training dynamics: gradient and weight norms, update-to-data ratios, learning rate, fp16 loss scale, loss
spikes, and what a non-finite loss or gradient does to the run.

The work happens in `on_before_optimizer_step`, after backward (and fp16 unscaling) and before the update,
at ONE host sync per optimizer step: a single `.tolist()` brings the step's loss, gradient norm and loss scale
(and the previous measuring step's weight statistics) to the host, and the NaN guard, spike detection and
logging work on those floats. Lightning calls callbacks' on_before_optimizer_step before the module's
configure_gradient_clipping, which clips with the norm measured here. Weight statistics of a measuring step
are computed on the device right after its update (on_train_batch_end; the copy of the weights that the
update ratio needs lives only across the optimizer step) and logged at the next step's sync.
"""

import math
import statistics
from collections import deque

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from gptlab.callbacks.config import MonitorConfig
from gptlab.distributed import full_tensor
from gptlab.errors import UserInputError


class NonFiniteLossError(UserInputError):
    """The loss or the gradients were NaN/Inf and callbacks.monitor.on_nan=stop."""

    label = "Training stopped"
    status = "diverged"


class TrainingMonitor(L.Callback):
    def __init__(self, cfg: MonitorConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.loss_spike.window)  # recent finite train losses
        self.counts = {"skipped_steps": 0, "nan_skipped": 0, "loss_spikes": 0}
        self._measuring: int | None = None  # the step whose update is being measured
        self._before: dict | None = None  # the weights before that update (for update_ratio)
        self._pending: tuple[int, dict] | None = None  # (step, its weight statistics, still on the device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # fp16's GradScaler
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # fused optimizers unscale inside step(): Lightning left it to them
        step = trainer.global_step + 1  # the step this update completes, as the loggers count
        norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None]))
        pl_module.grad_norm = norm  # configure_gradient_clipping clips with it: measured once per step

        on_device = {"loss": pl_module.last_train_loss, "grad_norm": norm}
        if scaler is not None:
            on_device["loss_scale"] = scaler._get_scale_async()  # the scale of this step's backward
        pending_step, stats = self._pending or (None, {})
        on_device |= stats
        host = dict(zip(on_device, torch.stack([v.float() for v in on_device.values()]).tolist()))  # the sync
        if self._pending:
            self._log_weight_stats(trainer, pending_step, host)
            self._pending = None

        self._guard(step, host, scaler is not None, optimizer)
        self.check_loss_spike(step, host["loss"])
        self._log_step(pl_module, optimizer, host)
        if (self.cfg.param_norm or self.cfg.update_ratio) and step % self.cfg.every_n_steps == 0:
            self._measuring = step
            self._before = snapshot(pl_module.model) if self.cfg.update_ratio else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._measuring is not None and trainer.global_step == self._measuring:  # its update is applied
            self._pending = (self._measuring, self._weight_stats(pl_module.model, self._before))
            self._measuring = self._before = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self._pending:  # the last step's weight statistics: no next step to bring them to the host
            step, stats = self._pending
            self._log_weight_stats(trainer, step, dict(zip(stats, torch.stack(list(stats.values())).tolist())))
            self._pending = None

    def _guard(self, step: int, host: dict, fp16: bool, optimizer) -> None:
        """NaN/Inf: stop, or drop this update. Under fp16, non-finite gradients with a finite loss are
        ordinary overflows that GradScaler skips (halving the scale): counted, not treated as NaN."""
        loss, norm = host["loss"], host["grad_norm"]
        if math.isfinite(loss) and math.isfinite(norm):
            return
        if fp16 and math.isfinite(loss):
            self.counts["skipped_steps"] += 1
            return
        if self.cfg.on_nan == "stop":
            what = "loss" if not math.isfinite(loss) else "gradients"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (train loss {loss}, gradient norm {norm}); the update of "
                f"step {step} was not applied and no checkpoint holds it. Lower optimizer.lr, check the data, "
                "or set callbacks.monitor.on_nan=skip to skip such batches"
            )
        # No gradients: the optimizer leaves weights and state alone (GradScaler's skip, for any precision).
        # The step still counts: its batch is consumed and the LR schedule moves on.
        optimizer.zero_grad(set_to_none=True)
        self.counts["nan_skipped"] += 1
        rank_zero_warn(f"non-finite loss or gradients at step {step}: update skipped (callbacks.monitor.on_nan=skip)")

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

    def _log_step(self, pl_module, optimizer, host: dict) -> None:
        # CPU tensors: Lightning keeps a logged value on its device, so these add no transfer to the GPU.
        def log(name: str, value: float) -> None:
            pl_module.log(name, torch.tensor(value, dtype=torch.float64))

        if self.cfg.grad_norm:
            log("grad_norm", host["grad_norm"])
        if self.cfg.lr:
            lrs = [group["lr"] for group in optimizer.param_groups]
            log("lr", lrs[0])
            if len(set(lrs)) > 1:  # e.g. Muon and AdamW groups
                for i, group in enumerate(optimizer.param_groups):
                    log(f"lr/{group.get('name', i)}", group["lr"])
        if "loss_scale" in host and self.cfg.loss_scale:
            log("loss_scale", host["loss_scale"])
            log("skipped_steps", self.counts["skipped_steps"])
        if self.cfg.on_nan == "skip":
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
    def _log_weight_stats(trainer, step: int, host: dict) -> None:
        # Straight to the loggers, at the step they describe (Lightning's self.log would file them a step late).
        metrics = {k: v for k, v in host.items() if k == "param_norm" or k.startswith("update_ratio/")}
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
        layer = name.rpartition(".")[0].replace("_orig_mod.", "").removeprefix("transformer.")
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
