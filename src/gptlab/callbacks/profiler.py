"""A torch.profiler trace of a few training steps (callbacks.profiler; debug=profile).

The schedule counts optimizer steps: `wait` steps run unprofiled (the first one pays for warm-up and
compilation), `warmup` steps are traced and thrown away, `active` steps are recorded. Each rank then
writes <run>/profile/trace_rank<r>.json, a Chrome trace (chrome://tracing, https://ui.perfetto.dev),
and rank 0 prints the top ops by `sort_by`, also kept in <run>/profile/top_ops.txt.
"""

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn
from torch.profiler import ProfilerActivity, profile, schedule

from gptlab.callbacks.config import ProfilerConfig
from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.console import say


class TorchProfiler(OnOptimizerStepEnd):
    def __init__(self, cfg: ProfilerConfig, out_dir: Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.trace_path: Path | None = None  # set once the trace is written
        self._profiler: profile | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        cfg = self.cfg
        activities = [ProfilerActivity.CPU]
        if pl_module.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._rank, self._first_step = trainer.global_rank, trainer.global_step
        self._last_step = trainer.global_step
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1),
            on_trace_ready=self._save,
            record_shapes=cfg.record_shapes,
            profile_memory=cfg.profile_memory,
            with_stack=cfg.with_stack,
        )
        self._profiler.start()

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        if self._profiler is None:  # done
            return
        self._last_step = step
        self._profiler.step()  # one optimizer step done: advance the schedule
        if self.trace_path is not None:
            self._stop()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._profiler is not None:
            self._stop()  # a run shorter than the schedule: stopping saves the steps recorded so far
        if self.trace_path is None:
            rank_zero_warn(
                f"profiler: no trace written; the run ended within the first "
                f"callbacks.profiler.wait + warmup = {self.cfg.wait + self.cfg.warmup} steps"
            )

    def _stop(self) -> None:
        self._profiler.stop()
        self._profiler = None

    def _save(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.out_dir / f"trace_rank{self._rank}.json"
        prof.export_chrome_trace(str(self.trace_path))
        if self._rank != 0:
            return
        first = self._first_step + self.cfg.wait + self.cfg.warmup + 1
        steps = f"{first}-{self._last_step}" if self._last_step > first else str(first)
        lines = [f"profiler: steps {steps} traced into {self.trace_path}"]
        if self.cfg.row_limit:
            table = prof.key_averages().table(sort_by=self.cfg.sort_by, row_limit=self.cfg.row_limit)
            (self.out_dir / "top_ops.txt").write_text(table + "\n")
            lines.append(table)
        say("\n".join(lines))
