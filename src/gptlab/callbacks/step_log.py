"""Each optimizer step's line of the loggers (metrics.jsonl, W&B), written as the step ends.

The module and the callbacks that measure a step put their numbers in GPTModule.step_metrics; this writes them as
one line every trainer.log_every_n_steps steps (and at the last), before the step's checkpoint is saved
(callbacks/checkpoints.py runs after every other callback). Lightning's self.log would write the line only after
the step's callbacks, so a run killed just after a checkpoint, and resumed from it, would lack that step's line.
"""

from gptlab.callbacks.step_end import OnOptimizerStepEnd


class StepLog(OnOptimizerStepEnd):
    """Listed after the callbacks that add to step_metrics: Lightning calls them in order."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        line, pl_module.step_metrics = pl_module.step_metrics, {}
        if step % self.every_n_steps == 0 or step >= trainer.max_steps or trainer.should_stop:
            for logger in trainer.loggers:
                logger.log_metrics(line, step=step)
