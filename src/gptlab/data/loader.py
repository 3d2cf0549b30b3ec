"""Batches of (inputs, targets) read from token shards.

A training loader is a map-style dataset whose item `i` is the i-th micro-batch of this rank: the
batch depends on `i` alone, so resuming at step s means starting at item s x grad_accum, and no
loader state needs saving. `SequentialBatches` reads the shards in order (like build-nanogpt); a
shuffling loader can replace it behind the same interface.
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from gptlab.data.shards import read_manifest, split_shards


class TokenWindows:
    """Non-overlapping windows of seq_len + 1 tokens (inputs plus the shifted target) over shards."""

    def __init__(self, folder: Path, split: str, seq_len: int):
        self.seq_len = seq_len
        self.shards = [shard.tokens() for shard in split_shards(folder, read_manifest(folder), split)]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]  # windows never span two shards
        self.offsets = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack windows `indices` into inputs and targets, (len(indices), seq_len) int64 each."""
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, (i, s) in enumerate(zip(indices, shard_of)):
            start = (i - self.offsets[s]) * self.seq_len
            rows[row] = self.shards[s][start : start + self.seq_len + 1]
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]


def epoch_batches(num_sequences: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Micro-batches per rank in an epoch: whole optimizer steps of `accumulation` micro-batches (the last
    sequences that do not fill a step go unread). So every step reads the same sequences, epoch after epoch,
    however the global batch is split into devices x micro-batch x accumulation."""
    return num_sequences // (batch_size * world_size * accumulation) * accumulation


def too_few(num_sequences: int, seq_len: int, batch_size: int, world_size: int, accumulation: int) -> str:
    times = f", {accumulation} times (one optimizer step)" if accumulation > 1 else ""
    return (
        f"{num_sequences} training sequences of {seq_len} tokens are too few for one micro-batch of "
        f"{batch_size} on each of {world_size} devices{times}"
    )


class SequentialBatches(Dataset):
    """Item i: micro-batch i of rank `rank`, taking windows in order and wrapping at the end of an epoch
    (`accumulation`: micro-batches per optimizer step; an epoch is a whole number of steps)."""

    def __init__(
        self, windows: TokenWindows, batch_size: int, rank: int = 0, world_size: int = 1, accumulation: int = 1
    ):
        self.windows, self.batch_size, self.rank, self.world_size = windows, batch_size, rank, world_size
        self.batches_per_epoch = epoch_batches(len(windows), batch_size, world_size, accumulation)
        if self.batches_per_epoch == 0:
            raise ValueError(too_few(len(windows), windows.seq_len, batch_size, world_size, accumulation))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = ((i % self.batches_per_epoch) * self.world_size + self.rank) * self.batch_size
        return self.windows.get(np.arange(first, first + self.batch_size))


class ValidationBatches(Dataset):
    """The first `num_windows` validation windows of each source (one dataset, or each of a mixture's), split
    across ranks: window w of them all (source w // num_windows) goes to rank w % world.

    Item i is (inputs, targets, weight, source): source says which source each row comes from. Every rank gets
    the same number of batches: a rank with fewer windows ends with a padding batch of weight 0, because under
    FSDP each forward pass gathers parameters with all ranks, and a rank that stopped early would leave the
    others waiting."""

    def __init__(
        self, sources: list[TokenWindows], num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1
    ):
        total = num_windows * len(sources)
        per_rank = -(-total // world_size)  # the most windows any rank has
        mine = np.arange(rank, total, world_size)
        self.batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        self.num_real = len(self.batches)
        self.batches += [np.arange(1)] * (-(-per_rank // batch_size) - self.num_real)  # window 0, weight 0
        self.sources, self.num_windows = sources, num_windows

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        source, window = np.divmod(self.batches[i], self.num_windows)
        x = torch.empty(len(window), self.sources[0].seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for k in np.unique(source):
            at = torch.from_numpy(source == k)
            x[at], y[at] = self.sources[k].get(window[source == k])
        return x, y, torch.tensor(1.0 if i < self.num_real else 0.0), torch.from_numpy(source)

class RangeSampler(Sampler[int]):
    """Yields start, start + 1, ..., stop - 1: the batch indices still to train on.

    Its length is the whole epoch's, stop: Lightning counts an epoch's batches from its start and, resuming
    mid-epoch, restores how many it has seen; the remaining count would end the resumed epoch early."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop
