"""Write summary.json from inside the run, on rank 0, once it has trained (or, resumed with no steps left,
validated): whichever way the ranks were started, the file holds what they measured. A run on one device also
keeps a short greedy sample of its model's text (eval.sample_tokens), for the result block."""

import time
from pathlib import Path

import lightning as L

from gptlab.callbacks.harness import HarnessEval
from gptlab.callbacks.hellaswag import HellaSwagEval
from gptlab.callbacks.throughput import ThroughputMeter
from gptlab.errors import Preempted
from gptlab.generate import greedy_text
from gptlab.summary import new_summary, write_summary


class RunSummary(L.Callback):
    def __init__(
        self, run_dir: Path, started: float, seed: int, tokens_per_step: int, sample: tuple[str, int] = ("", 0)
    ):
        """started: time.time() when the job began; sample: (prompt, tokens) of the greedy sample (0: none)."""
        self.run_dir, self.started, self.seed, self.tokens_per_step = run_dir, started, seed, tokens_per_step
        self.sample_prompt, self.sample_tokens = sample

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, trainer.global_step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":  # a resumed run with no steps left: its checkpoint, validated
            self._write(trainer, pl_module, pl_module.loaded_step or 0)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Preempted):  # stopped at a step boundary, checkpointed: its numbers so far
            self._write(trainer, pl_module, exception.step, status="preempted")

    def _write(self, trainer, pl_module, step: int, status: str = "completed") -> None:
        """The run's numbers, as the module and the other callbacks (where present) measured them."""
        throughput = next((c.medians() for c in trainer.callbacks if isinstance(c, ThroughputMeter)), {})
        scores = next((c.result for c in trainer.callbacks if isinstance(c, HellaSwagEval)), None) or {}
        harness = next((c.result for c in trainer.callbacks if isinstance(c, HarnessEval)), None)
        wall_s = round(time.time() - self.started, 2)
        summary = new_summary(
            status=status,
            step=step,
            tokens=step * self.tokens_per_step,
            train_loss=pl_module.step_stats.get("loss"),
            val_loss=pl_module.val_metrics.get("val/loss"),
            val_loss_initial=pl_module.initial_val_metrics.get("val/loss"),
            val_bpb=pl_module.val_metrics.get("val/bpb"),
            val_bpb_initial=pl_module.initial_val_metrics.get("val/bpb"),
            hellaswag_acc=scores.get("acc"),
            hellaswag_acc_norm=scores.get("acc_norm"),
            hellaswag_acc_bytes=scores.get("acc_bytes"),
            hellaswag_n=scores.get("n"),
            harness=harness,  # {"<task>/<metric>": value}
            **_mixture(trainer.datamodule, pl_module, step),
            **throughput,  # tokens_per_s, samples_per_s, step_time_ms, mfu (not on CPU)
            wall_s=wall_s,
            seed=self.seed,
            params=pl_module.model.num_params(),
            run_dir=str(self.run_dir),
            sample=self._sample(trainer, pl_module) if status == "completed" else None,
        )
        write_summary(self.run_dir, summary)


    def _sample(self, trainer, pl_module) -> str | None:
        """Not under several ranks: a sharded model generates only with every rank taking part."""
        if self.sample_tokens == 0 or trainer.world_size > 1:
            return None
        return greedy_text(pl_module.model, self.sample_prompt, self.sample_tokens)


def _mixture(datamodule, pl_module, step: int) -> dict:
    """A mixture's sources: weight, realised share, tokens, passes, repeats; and each one's validation."""
    if not getattr(datamodule, "cfg", None) or not datamodule.cfg.mixture:
        return {}
    val = {name: {key.removeprefix("val/").split("/")[0]: value for key, value in pl_module.val_metrics.items()
                  if key.endswith(f"/{name}")} for name in pl_module.val_sources}  # fmt: skip
    return {"data_mixture": datamodule.mixture_report(step), "val_by_source": val}
