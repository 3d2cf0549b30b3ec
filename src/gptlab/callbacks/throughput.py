"""Training throughput in tokens per second, measured between logging steps, validation time excluded."""

import statistics
import time

import lightning as L


class ThroughputMonitor(L.Callback):
    def __init__(self, tokens_per_step: int, log_every_n_steps: int):
        self.tokens_per_step = tokens_per_step
        self.every = log_every_n_steps
        self.rates: list[float] = []  # tokens/s of each logging interval

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # still accumulating micro-batches
            return
        self._last_step = step
        if step % self.every == 0:
            rate = (step - self._start_step) * self.tokens_per_step / (time.perf_counter() - self._start_time)
            pl_module.log("tokens_per_s", rate)
            self.rates.append(rate)
            self._mark(step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if hasattr(self, "_start_time"):  # validation inside fit: keep its time out of the interval
            self._start_time += time.perf_counter() - self._val_start

    def _mark(self, step: int) -> None:
        self._start_step, self._last_step, self._start_time = step, step, time.perf_counter()

    def median_rate(self) -> float | None:
        """Median over logging intervals, the first (warm-up, compilation) left out when there are others."""
        rates = self.rates[1:] or self.rates
        return statistics.median(rates) if rates else None
