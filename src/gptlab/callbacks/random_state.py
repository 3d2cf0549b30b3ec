"""The random number generators' states, saved in every checkpoint and restored before each training batch."""

import random

import lightning as L
import numpy as np
import torch


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
