"""The run's results (summary.json's numbers) as Lightning callback metrics, which reach the caller under
every strategy.

Under DDP started by spawn (distributed=ddp_spawn, and ddp inside a multirun) the ranks train in child
processes: the launching process keeps its own untouched copies of the module and the callbacks, and
Lightning sends back only the weights and `trainer.callback_metrics`. So the results travel there."""

import lightning as L
import torch

PREFIX = "results/"


class RunResults(L.Callback):
    def __init__(self, throughput, hellaswag):
        self.throughput, self.hellaswag = throughput, hellaswag  # ThroughputMonitor, HellaSwagEval or None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Asked to stop after its last optimizer step, Lightning validates there, inside fit. A trainer.validate()
        # after fit would, under spawn, start the ranks again from the launching process's stale copies (step 0,
        # loggers that overwrite the run's metrics.csv).
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        scores = (self.hellaswag and self.hellaswag.result) or {}
        _put(trainer, {
            "step": trainer.global_step,
            "train_loss": pl_module.last_train_loss,
            "val_loss": pl_module.last_val_loss,
            "val_step": pl_module.last_val_step,  # the step val_loss was measured at
            "val_loss_initial": pl_module.initial_val_loss,
            "hellaswag_acc": scores.get("acc"),
            "hellaswag_acc_norm": scores.get("acc_norm"),
            "hellaswag_n": scores.get("n"),
            **self.throughput.medians(),  # tokens_per_s, samples_per_s, step_time_ms, mfu (not on CPU)
        })  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # the validation after the last step (fit's are in on_train_end)
            _put(trainer, {"val_loss": pl_module.last_val_loss})


def _put(trainer, results: dict) -> None:
    for key, value in results.items():
        if value is not None:
            trainer.callback_metrics[PREFIX + key] = torch.tensor(float(value), dtype=torch.float64)


def read_results(trainer) -> dict:
    """What RunResults put, as Python numbers (None where there was nothing)."""
    metrics = trainer.callback_metrics
    return {key.removeprefix(PREFIX): float(v) for key, v in metrics.items() if key.startswith(PREFIX)}
