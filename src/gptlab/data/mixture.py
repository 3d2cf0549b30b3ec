"""Training batches drawn from several prepared datasets by weight (data.mixture).

Each source is read as gptlab.data.shuffle reads one dataset: its documents permuted, concatenated and cut into
sequences, pass after pass; the j-th sequence a source supplies is sequence j mod S of its pass j // S (S: its
sequences per pass). A source that runs out is re-permuted (pass j // S, seeded anew) and read again: a repeat.

Which source each sequence of the run comes from is fixed by stride scheduling, deterministic as Megatron-LM's
blended datasets (which take the source furthest behind its weight): source k's j-th sequence is due at time
(j + 1/2) / w_k, and the sequences of all sources are taken in order of due time (ties in source order). Among
any first n sequences, source k then supplies w_k * n of them to within about one, so the realised token ratios
match the weights in every optimizer step, not only on average. How many of the first n sequences each source
supplies is computed directly (`counts`), so item i depends on i alone: a resumed run continues exactly.

The G sequences of an optimizer step (G = micro-batch x devices x accumulation) are put in a random order seeded
by (seed, step) and dealt out as in shuffle.py: micro-batch i of rank r holds the step's sequences
[(i' * world + r) * B, ... + B), i' = i mod accumulation; the ranks' batches are disjoint and together are the
step's G sequences, for any devices and micro-batch with the same global batch. Every row of a batch comes from
one source; the loss is the mean over all rows, so each source weighs in by its share of the rows.

Memory: each source's index as in shuffle.py (12 bytes per document, 8 per sequence); a second pass's tables are
held only while a step reads the end of one pass and the start of the next. A batch's rows, whatever their
sources, are cut and read in one go (MixtureTokens).
"""

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gptlab.data.loader import too_few
from gptlab.data.shards import ShardError
from gptlab.data.shuffle import ShuffledSequences, TokenArray, TrainTokens, cut

STEP_ORDER = 0x6D6978  # mixes the run's seed into the seed of each step's row order ("mix")
PASSES = 1 << 32  # a source's passes are numbered below this


class StrideSchedule:
    """Which source each sequence of the run comes from, and its index among that source's sequences."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        self.weights = np.array(weights, dtype=np.float64) / total
        self.active = [k for k, w in enumerate(self.weights) if w > 0]

    def due(self, k: int, j: int) -> float:
        """When source k's j-th sequence is due (float64, computed alike here and in `take`)."""
        return float((j + 0.5) / self.weights[k])

    def counts(self, n: int) -> np.ndarray:
        """How many of the first n sequences each source supplies (an int64 array, one count per source)."""
        counts = np.zeros(len(self.weights), dtype=np.int64)
        for k in self.active:  # those due before time n: a prefix of the order, within about one of w_k * n each
            j = max(0, math.ceil(n * self.weights[k] - 0.5))
            while j > 0 and self.due(k, j - 1) >= n:
                j -= 1
            while self.due(k, j) < n:
                j += 1
            counts[k] = j
        while counts.sum() < n:  # then the next in order, or back off the last, until exactly n
            k = min(self.active, key=lambda k: (self.due(k, counts[k]), k))
            counts[k] += 1
        while counts.sum() > n:
            k = max((k for k in self.active if counts[k]), key=lambda k: (self.due(k, counts[k] - 1), k))
            counts[k] -= 1
        return counts

    def take(self, first: int, count: int, start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sequences first .. first + count - 1 of the run: each one's source and its index in that source.
        start: `counts(first)`, if the caller knows it."""
        start = self.counts(first) if start is None else start
        active = np.array(self.active)
        source = np.repeat(active, count)  # the next `count` of each source hold the next `count` of all
        index = start[source] + np.tile(np.arange(count), len(active))
        chosen = np.lexsort((source, (index + 0.5) / self.weights[source]))[:count]
        return source[chosen], index[chosen]


class MixtureBatches(Dataset):
    """Item i: micro-batch i of rank `rank`, each row a sequence of one source, drawn by weight (see module doc)."""

    def __init__(
        self,
        folders: list[Path],
        weights: list[float],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        align_to_documents: bool = False,
        accumulation: int = 1,
    ):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.accumulation, self.seq_len = accumulation, seq_len
        self.step_sequences = batch_size * world_size * accumulation
        self.schedule = StrideSchedule(weights)
        # Sources with weight 0 are only validated on. Two passes kept: a step may straddle a source's passes.
        self.streams = [
            ShuffledSequences(folder, seq_len, seed, align_to_documents, keep_epochs=2) if weight > 0 else None
            for folder, weight in zip(folders, weights)
        ]
        for folder, stream in zip(folders, self.streams):
            if stream is not None and stream.num_sequences == 0:
                raise ShardError(f"{folder}: {too_few(0, seq_len, batch_size, world_size, accumulation)}")
        self.per_pass = np.array([stream.num_sequences if stream else 1 for stream in self.streams])
        self._step: tuple[int, np.ndarray, np.ndarray] | None = None  # the last step's step_order
        self._read_after: dict[int, np.ndarray] = {}  # sequences read from each source before the next step
        self._tokens: MixtureTokens | None = None

    def __len__(self) -> int:
        """Micro-batches until the first source runs out (a mixture has no common epoch)."""
        read = self.schedule.weights * self.step_sequences  # sequences of each source per step
        return min(int(s.num_sequences // read[k]) for k, s in enumerate(self.streams) if s) * self.accumulation

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro = divmod(i, self.accumulation)
        first = (micro * self.world_size + self.rank) * self.batch_size
        group, seq = (a[first : first + self.batch_size] for a in self.step_order(step))
        # The rows by source and pass; each group's pieces of documents, placed in one token space (`tokens`), are
        # then cut into sequences and read at once.
        rows = np.argsort(group, kind="stable")
        group, seq = group[rows], seq[rows]
        ends = [*(np.flatnonzero(np.diff(group)) + 1).tolist(), len(group)]
        starts, lengths, per_seq = [], [], []
        for lo, hi in zip([0, *ends[:-1]], ends):
            k, epoch = divmod(int(group[lo]), PASSES)
            piece_starts, piece_lengths, pieces = self.streams[k].pieces(epoch, seq[lo:hi])
            starts.append(piece_starts + self.tokens.offsets[k])
            lengths.append(piece_lengths)
            per_seq.append(pieces)
        ranges = cut(np.concatenate(starts), np.concatenate(lengths), np.concatenate(per_seq), self.seq_len)
        batch = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        batch[rows] = self.tokens.read(*ranges).reshape(-1, self.seq_len + 1)
        batch = torch.from_numpy(batch)
        return batch[:, :-1], batch[:, 1:]

    @property
    def tokens(self) -> "MixtureTokens":
        if self._tokens is None:  # opened lazily, in the process that reads
            self._tokens = MixtureTokens([stream.tokens if stream else None for stream in self.streams])
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def step_order(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's sequences in the step's seeded random order: each one's group (source * PASSES + pass) and
        its index in that pass of that source."""
        if self._step is None or self._step[0] != step:
            first = step * self.step_sequences
            before = self._read_after.get(first)  # where the previous step ended, if it was the step before
            before = self.schedule.counts(first) if before is None else before
            source, index = self.schedule.take(first, self.step_sequences, before)
            self._read_after = {first + self.step_sequences: before + np.bincount(source, minlength=len(before))}
            for stream, n in zip(self.streams, before.tolist()):
                if stream:  # passes this step no longer reads: their tables are dropped
                    stream.forget_before(n // stream.num_sequences)
            epoch, seq = np.divmod(index, self.per_pass[source])
            order = np.random.default_rng([self.seed, STEP_ORDER, step]).permutation(self.step_sequences)
            self._step = (step, (source * PASSES + epoch)[order], seq[order])
        return self._step[1], self._step[2]

    def repeats(self, steps: int) -> list[int]:
        """How many times each source has run out and been re-permuted, after `steps` optimizer steps."""
        read = self.schedule.counts(steps * self.step_sequences)
        return [max(0, (int(n) - 1) // s.num_sequences) if s else 0 for n, s in zip(read, self.streams)]


class MixtureTokens(TokenArray):
    """Every source's training tokens as one array (source k's position p is offsets[k] + p), so that a batch of
    several sources is read at once."""

    def __init__(self, sources: list[TrainTokens | None]):  # None: a source that is not trained on
        super().__init__([array for tokens in sources if tokens for array in tokens.arrays])
        sizes = [tokens.bounds[-1] if tokens else 0 for tokens in sources]
        self.offsets = np.cumsum([0] + sizes[:-1])
