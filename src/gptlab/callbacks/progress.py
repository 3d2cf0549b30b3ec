"""The progress bar, in optimizer steps.

Lightning's bar counts micro-batches: with gradient accumulation it reaches the loader's length halfway through
the run and goes on as "54/?", its time estimate off by the accumulation factor, and it shows the epoch and a
v_num. This bar counts the run's optimizer steps out of its budget, from the step a resumed run starts at, so its
estimate is right; it shows the train loss, the last validation loss and tokens/s. Validation shows no bar of its
own: the bar says "validating" meanwhile.
"""

import sys

from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm

from gptlab.callbacks.throughput import ThroughputMeter


class StepProgressBar(ProgressBar):
    def __init__(self, total_steps: int, refresh_rate: int):
        """refresh_rate: update the numbers every that many optimizer steps."""
        super().__init__()
        self.total_steps, self.refresh_rate = total_steps, refresh_rate
        self.enabled = True
        self.bar: tqdm | None = None
        self._step = 0
        self._val_loss: float | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step
        if self.enabled and trainer.is_global_zero:
            self.bar = tqdm(total=self.total_steps, initial=self._step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None or trainer.global_step == self._step:
            return  # not the last micro-batch of a step
        self.bar.update(trainer.global_step - self._step)
        self._step = trainer.global_step
        if self._step % self.refresh_rate == 0 or self._step == self.total_steps:
            self._show(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.bar is not None and not trainer.sanity_checking:
            self.bar.set_postfix_str(f"{self.bar.postfix or ''} validating".strip())

    def on_validation_end(self, trainer, pl_module) -> None:
        self._val_loss = pl_module.val_metrics.get("val/loss")
        if self.bar is not None and not trainer.sanity_checking:
            self._show(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def _show(self, trainer, pl_module) -> None:
        numbers = {"loss": pl_module.step_stats.get("loss"), "val": self._val_loss}
        meter = next((c for c in trainer.callbacks if isinstance(c, ThroughputMeter)), None)
        if meter is not None and meter.intervals:  # validation time excluded
            numbers["tok/s"] = meter.intervals[-1]["tokens_per_s"]
        shown = [f"{k} {v:,.0f}" if k == "tok/s" else f"{k} {v:.3f}" for k, v in numbers.items() if v is not None]
        self.bar.set_postfix_str(", ".join(shown))

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
