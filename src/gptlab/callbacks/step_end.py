"""Callbacks that act once per optimizer step, after its update; and evaluations that run every N steps.

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


class PeriodicEvaluation(OnOptimizerStepEnd):
    """An evaluation every `every_n_steps` optimizer steps (0: none) and once after the last step, never twice at
    one step. Subclasses implement score(pl_module) -> {metric: value} (on every rank, in eval mode and restored)
    and may override ready() (e.g. False without data)."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._scored_step = -1

    def ready(self) -> bool:
        return True

    def score(self, pl_module) -> dict[str, float]:
        raise NotImplementedError

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        if self.ready() and self.every_n_steps and step % self.every_n_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.ready() and trainer.global_step != self._scored_step:
            self._evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module) -> None:
        metrics = self.score(pl_module)
        self._scored_step = trainer.global_step
        # Straight to the loggers at this step: self.log would attach the scores to a later step's row.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
