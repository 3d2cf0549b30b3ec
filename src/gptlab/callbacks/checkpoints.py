"""Checkpoints a run can resume from exactly: step_XXXXXX.ckpt and last.ckpt in <run>/checkpoints/.

Lightning saves the model, optimizer, scheduler, fp16 loss scaler, loop counters and the datamodule's data
position; gptlab adds the model config, the RNG states (callbacks/random_state.py) and the monitor's counts.
Every file is taken at the end of a training step (one saved after fit() returned would resume as a new epoch,
gradient accumulation out of phase) and written atomically: a kill during a save leaves the previous file whole.
"""

import re
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.config import SHARDED_META, is_sharded_checkpoint
from gptlab.files import atomic_open, remove

LAST = "last.ckpt"
STEP_FILE = re.compile(r"step_(\d{6,})\.ckpt")


def step_file(step: int) -> str:
    return f"step_{step:06d}.ckpt"


class StepCheckpoints(OnOptimizerStepEnd, Checkpoint):
    """step_XXXXXX.ckpt and last.ckpt every `every_n_steps` optimizer steps, and last.ckpt after the run's last
    step (its budget, or the step a callback stopped it at). save_top_k: how many step files to keep, newest
    first (-1: all); last.ckpt always stays.

    Saved through trainer.save_checkpoint, on every rank (FSDP's sharded save is a collective). A Checkpoint
    subclass, so Lightning runs it after the other callbacks: the RNG states and counts it saves are the step's."""

    def __init__(self, dirpath: Path, every_n_steps: int, save_top_k: int):
        self.dirpath, self.every_n_steps, self.save_top_k = Path(dirpath), every_n_steps, save_top_k

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        periodic = step % self.every_n_steps == 0
        if periodic:
            trainer.save_checkpoint(self.dirpath / step_file(step))
            if trainer.is_global_zero:
                self._prune(step)
        if periodic or step >= trainer.max_steps or trainer.should_stop:
            trainer.save_checkpoint(self.dirpath / LAST)

    def _prune(self, step: int) -> None:
        """Keep the newest save_top_k step files up to `step` (later ones, left by a run resumed from an
        earlier step into its own folder, are written over as this run reaches them)."""
        if self.save_top_k < 0:
            return
        steps = sorted(int(m[1]) for p in self.dirpath.iterdir() if (m := STEP_FILE.fullmatch(p.name)))
        for old in [s for s in steps if s <= step][: -self.save_top_k or None]:
            remove(self.dirpath / step_file(old))


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
    loading its tensors: a sharded checkpoint keeps the step in its meta.pt."""
    if is_sharded_checkpoint(path):
        path = Path(path) / SHARDED_META
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
