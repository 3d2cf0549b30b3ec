"""Checkpoints a run can resume from exactly: step_XXXXXX.ckpt and last.ckpt in <run>/checkpoints/.

Lightning saves the model, optimizer, scheduler, fp16 loss scaler, loop counters and the datamodule's data
position; gptlab adds the model config, the RNG states (callbacks/random_state.py) and the monitor's counts.
A step's file is taken once all the step writes is written, so that a run resumed from it loses no line of
metrics.jsonl: at the step's end, after its metrics line (callbacks/step_log.py); or, where a validation follows
the step, once that has run and logged. Those are the two points Lightning resumes from mid-epoch (one saved after
fit() returned would resume as a new epoch, gradient accumulation out of phase). Files are written atomically: a
kill during a save leaves the previous file whole.
"""

from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from gptlab.callbacks.preemption import Preemption
from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.config import LAST_CHECKPOINT, STEP_FILE
from gptlab.files import atomic_open, link_or_copy, remove
from gptlab.resume import read_meta


def step_file(step: int) -> str:
    return f"step_{step:06d}.ckpt"


class StepCheckpoints(OnOptimizerStepEnd, Checkpoint):
    """step_XXXXXX.ckpt and last.ckpt every `every_n_steps` optimizer steps, and last.ckpt after the run's last
    step (its budget, the step a callback stopped it at, or a preemption's). save_top_k: how many step files to
    keep, newest first (-1: all); last.ckpt always stays.

    Saved through trainer.save_checkpoint, on every rank (FSDP's sharded save is a collective). A Checkpoint
    subclass, so Lightning runs it after the other callbacks: the RNG states and counts it saves are the step's."""

    def __init__(self, dirpath: Path, every_n_steps: int, save_top_k: int, preemption: Preemption | None = None):
        self.dirpath, self.every_n_steps, self.save_top_k = Path(dirpath), every_n_steps, save_top_k
        self.preemption = preemption  # last.ckpt also at the step a signal stops the run at
        self._due: int | None = None  # a step whose files wait for the validation that follows it

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        last = step >= trainer.max_steps or trainer.should_stop  # the run's last step
        preempted = self.preemption is not None and self.preemption.stopping
        if not (step % self.every_n_steps == 0 or last or preempted):
            return
        if validates_after(trainer, step, last):
            self._due = step
        else:
            self._save(trainer, step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._due is not None and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer, self._due)
            self._due = None

    def _save(self, trainer, step: int) -> None:
        last = self.dirpath / LAST_CHECKPOINT
        if step % self.every_n_steps == 0:
            path = self.dirpath / step_file(step)
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                self._prune(step)
            if trainer.strategy.broadcast(path.is_file()):  # one file (not a sharded folder): every rank alike
                if trainer.is_global_zero:
                    link_or_copy(path, last)  # the same bytes under a second name: no second save, no more disk
                return
        trainer.save_checkpoint(last)

    def _prune(self, step: int) -> None:
        """Keep the newest save_top_k step files up to `step` (later ones, left by a run resumed from an
        earlier step into its own folder, are written over as this run reaches them)."""
        if self.save_top_k < 0:
            return
        steps = sorted(int(m[1]) for p in self.dirpath.iterdir() if (m := STEP_FILE.fullmatch(p.name)))
        for old in [s for s in steps if s <= step][: -self.save_top_k or None]:
            remove(self.dirpath / step_file(old))


def validates_after(trainer, step: int, last: bool) -> bool:
    """Does Lightning run a validation right after optimizer step `step`? Every val_check_batch micro-batches, and
    after the last step."""
    return trainer.enable_validation and (last or step * trainer.accumulate_grad_batches % trainer.val_check_batch == 0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save streamed into a temporary file beside the target, then renamed over it (gptlab.files.atomic_open):
    readers, and a resumed run, see the old checkpoint or the new one, never part of one. Lightning's own writer
    truncates the target first. Streaming into the file also avoids a second in-memory copy."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_open(Path(path)) as f:
            torch.save(checkpoint, f)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint (a file, or a sharded checkpoint folder) was saved at, read without
    loading its tensors; a file that does not read is one line naming it (gptlab.resume.read_meta)."""
    return int(read_meta(path)["global_step"])
