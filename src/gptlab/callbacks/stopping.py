"""Stop training as soon as the train loss falls below a threshold (trainer.stopping_threshold; debug=overfit).

Lightning's EarlyStopping has the same `stopping_threshold`, but checks it only after validation; this
checks the loss of every optimizer step, so an overfitting run ends at the first step below it.
"""

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.console import say

_say = rank_zero_only(say)  # every rank decides alike; one says so


class StoppingThreshold(OnOptimizerStepEnd):
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.reached_at: int | None = None  # the step whose train loss fell below the threshold

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        loss = pl_module.step_stats["loss"]  # the mean over micro-steps and ranks: every rank decides alike
        if loss < self.threshold:
            self.reached_at = step
            trainer.should_stop = True
            _say(f"stopping_threshold: train/loss {loss:.4f} < {self.threshold:g} at step {step}; stopping")

    def on_train_end(self, trainer, pl_module) -> None:
        reached = self.reached_at is not None
        for logger in trainer.loggers:  # Lightning's self.log is closed after training
            logger.log_metrics({"stopping_threshold_reached": float(reached)}, step=trainer.global_step)
        if not reached:
            rank_zero_warn(
                f"train/loss never fell below trainer.stopping_threshold={self.threshold:g} in "
                f"{trainer.global_step} steps (the run's budget); raise the budget or the learning rate"
            )

