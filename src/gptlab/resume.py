"""Checkpoints a run can resume from exactly, on top of what Lightning saves itself (model, optimizer,
scheduler, fp16 loss scaler, loop counters, and the datamodule's data position):

- every checkpoint file is written atomically: a kill during a save leaves the previous file whole;
- all are taken at the end of a training step, the final last.ckpt included;
- the random number generators travel in the checkpoint, so dropout continues as if never stopped.
"""

import os
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlab.config import SHARDED_META, is_sharded_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file next to the target, fsync, then rename it over the target: readers
    (and a resumed run) see the old checkpoint or the new one, never part of one. Lightning's own writer
    truncates the target first. Streaming into the file also avoids a second in-memory copy."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed while saving
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # make the rename itself survive a power loss


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (step files and last.ckpt every N steps), plus last.ckpt after the final
    step, or the step a callback stopped the run at. Every file is taken at the end of a training step:
    one saved once fit() has returned would resume as a new epoch, gradient accumulation out of phase."""

    def __init__(self, *args, resume_from: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from

    def setup(self, trainer, pl_module, stage: str) -> None:
        in_place = self.resume_from is not None and Path(self.resume_from).parent == Path(self.dirpath)
        with warnings.catch_warnings():
            if in_place:  # a run resumed into its own folder finds its checkpoints there, as it should
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            super().setup(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (trainer.global_step >= trainer.max_steps or trainer.should_stop):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # The last step: saved now, where Lightning would defer to the validation that follows an epoch's end.
        if self._should_skip_saving_checkpoint(trainer):  # saved already, or not fitting
            return
        candidates = self._monitor_candidates(trainer)
        if trainer.global_step % self._every_n_train_steps == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class RandomState(L.Callback):
    """Saves the Python, NumPy and torch (CPU, and the current CUDA device) generator states in every
    checkpoint as `rng_states`, and starts each training batch from the state the previous batch ended in.

    Whatever runs between two batches (validation, a checkpoint, a data loader drawing its worker seed)
    so leaves the training stream alone: a resumed run's first batch starts from the saved state and sees
    the dropout masks an uninterrupted run sees, and changing eval.every_n_steps changes no training step.
    Under DDP every rank is seeded alike and draws alike, so rank 0's states are every rank's."""

    def __init__(self):
        self._next: dict | None = None  # the state the next training batch starts from

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._next is not None:
            set_rng_states(self._next)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._next = rng_states()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = self._next if self._next is not None else rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._next = checkpoint.get("rng_states")  # applied at the first batch, after the loaders are set up


def rng_states() -> dict:
    """The global generators' states as tensors, lists and numbers: loadable with torch.load(weights_only=True)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if cuda else None,
    }


def set_rng_states(states: dict) -> None:
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached_gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint (a file, or a sharded checkpoint folder) was saved at, read without
    loading its tensors: a sharded checkpoint keeps the step in its meta.pt."""
    if is_sharded_checkpoint(path):
        path = Path(path) / SHARDED_META
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
