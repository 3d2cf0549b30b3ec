"""Training throughput between logging steps, validation time excluded: tokens/s, samples (sequences)/s, the
optimizer step's time, and MFU where the GPU's peak FLOP/s is known (gptlab.flops; no `mfu` key on CPU).

The hot path only reads the host clock: no .item(), no tensors on the device. The numbers join the step's line
(GPTModule.step_metrics) on logging steps, as host floats. With CUDA running ahead of the host, an
interval ends when the host has queued its steps; at a steady state the queue's depth cancels between intervals.
"""

import statistics
import time

import torch
from lightning.pytorch.utilities import rank_zero_only

from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.console import say
from gptlab.flops import gpu_label, mfu, peak_flops

METRICS = ("tokens_per_s", "samples_per_s", "step_time_ms", "mfu")  # wall-clock: they differ between equal runs


class ThroughputMeter(OnOptimizerStepEnd):
    def __init__(
        self, tokens_per_step: int, log_every_n_steps: int, seq_len: int, flops_per_token: int, precision: str
    ):
        """tokens_per_step: over all devices; flops_per_token: gptlab.flops.flops_per_token; precision: bf16 |
        fp16 | tf32 | fp32 (gptlab.flops.precision_kind), the column of the peak-FLOPs table."""
        self.tokens_per_step, self.every, self.seq_len = tokens_per_step, log_every_n_steps, seq_len
        self.flops_per_token, self.precision = flops_per_token, precision
        self.peak: float | None = None  # FLOP/s of all devices together; None: no MFU
        self.intervals: list[dict[str, float]] = []  # the logged metrics of each logging interval

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        device = pl_module.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        peak = peak_flops(name, self.precision)
        self.peak = None if peak is None else peak * trainer.world_size
        _announce(self.flops_per_token, peak, name, gpu_label(name), self.precision)
        self._mark(trainer.global_step)

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        if step % self.every == 0:
            metrics = self._measure(step - self._start_step, time.perf_counter() - self._start_time)
            pl_module.step_metrics |= metrics
            self.intervals.append(metrics)
            self._mark(step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if hasattr(self, "_start_time"):  # validation inside fit: keep its time out of the interval
            self._start_time += time.perf_counter() - self._val_start

    def _mark(self, step: int) -> None:
        self._start_step, self._start_time = step, time.perf_counter()

    def _measure(self, steps: int, seconds: float) -> dict[str, float]:
        tokens_per_s = steps * self.tokens_per_step / seconds
        metrics = {
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / self.seq_len,
            "step_time_ms": 1000 * seconds / steps,
        }
        if self.peak is not None:
            metrics["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.peak)
        return metrics

    def medians(self) -> dict[str, float]:
        """Median of each metric over the logging intervals, the first (warm-up, compilation) left out when
        there are others. Empty before the first interval; no `mfu` where the peak is unknown."""
        intervals = self.intervals[1:] or self.intervals
        keys = intervals[0].keys() if intervals else ()
        return {key: statistics.median(m[key] for m in intervals) for key in keys}


@rank_zero_only
def _announce(flops_per_token: int, peak: float | None, name: str, label: str | None, precision: str) -> None:
    if peak is None:
        say(f"MFU: not reported on {name} ({precision}): no peak FLOP/s known for it")
    else:
        say(
            f"MFU: PaLM 6N+12LHQT FLOPs/token = {flops_per_token:,} (N without position embeddings), "
            f"peak {peak / 1e12:g} TFLOPS per device ({name} = {label}, {precision}, dense)",
        )
