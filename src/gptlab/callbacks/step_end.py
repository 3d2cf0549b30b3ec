"""A callback that acts once per optimizer step, after its update.

Lightning calls on_train_batch_end after every micro-batch; with gradient accumulation only the last
micro-batch of a step completes it (trainer.global_step moves on). Lightning has no hook of its own for that.
"""

import lightning as L


class OnOptimizerStepEnd(L.Callback):
    """Subclasses implement on_optimizer_step_end(trainer, pl_module, step), called after the update of optimizer
    step `step` (= trainer.global_step, the steps completed). A subclass that overrides on_train_start calls
    super().on_train_start first."""

    _seen_step: int | None = None  # trainer.global_step at the previous micro-batch's end

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step  # a resumed run's first step ends at the next one

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._seen_step:
            self._seen_step = trainer.global_step
            self.on_optimizer_step_end(trainer, pl_module, trainer.global_step)

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        raise NotImplementedError
