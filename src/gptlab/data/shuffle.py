"""Training batches from a new seeded permutation of all training documents every epoch.

The train shards are read as one virtual token array: shard after shard in manifest order, so a
document that continues into the next shard is simply a longer range. Epoch e:

1. Documents are permuted by `np.random.default_rng([seed, e])`, across all shards.
2. The permuted documents are concatenated into one stream, which is cut into sequences of
   seq_len + 1 tokens with stride seq_len (inputs plus the shifted targets), as in nanoGPT: every
   token is an input exactly once, except the last few that do not fill a sequence; a document
   longer than seq_len just continues into the next sequence.
3. Sequences are dealt out as in `SequentialBatches`: micro-batch i of rank r holds sequences
   [(i * world_size + r) * B, ... + B), so the ranks together read exactly the single-process epoch;
   an epoch ends on an optimizer step, so each step reads the same sequences for any devices and
   micro-batch with the same global batch.

Item i is micro-batch i % len of epoch i // len; it depends on i alone, so resuming is exact.

`align_to_documents=True` moves the start of every sequence forward from its place on that grid
(s * seq_len) to the next document start, or, inside a document longer than seq_len, to the next
of its pieces (which start every seq_len tokens from the document start). A sequence then runs on
for seq_len + 1 tokens into whatever follows, so there is no padding. Each start moves less than
seq_len, so the epoch has as many sequences as without alignment, bar one kept in reserve, for
every permutation (`len` does not depend on the epoch; short documents do not all start a
sequence), and the moves cancel out: a token near a document boundary may be read twice or
skipped, but tokens are read once on average. (Rules that drop the rest of a document cut by the
end of a sequence change the epoch length with the permutation, so they cannot serve "item i is
batch i".)

Memory: the global start of every document (int64) and the permutation (int32): 12 bytes per
document; per sequence, where it starts, as (position in the permutation, offset in that document),
two int32: 8 bytes. Only the current epoch's tables are kept; they are built lazily in each
process (DataLoader workers included), chunk by chunk so that building needs little more.
"""

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gptlab.data.loader import epoch_batches, too_few
from gptlab.data.shards import Shard, ShardError, read_manifest, split_shards

CHUNK_DOCS = 1 << 18  # documents handled at a time when building an epoch's tables (~15 MB)


class TokenArray:
    """Token arrays (shards) read as one: position p of shard k is bounds[k] + p."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.bounds = np.cumsum([0] + [len(a) for a in arrays])  # array k holds tokens [bounds[k], bounds[k+1])

    def read(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The ranges [start, start + length) concatenated (lengths > 0; a range may cross arrays)."""
        ends = starts + lengths
        first = np.searchsorted(self.bounds, starts, side="right") - 1
        last = np.searchsorted(self.bounds, ends - 1, side="right") - 1
        if (first == last).all():  # each range within one array: the common case, and the fast one
            shard, lo, hi = first, starts - self.bounds[first], ends - self.bounds[first]
        else:
            parts = last - first + 1  # how many arrays each range touches
            range_of = np.repeat(np.arange(len(starts)), parts)
            shard = first[range_of] + np.arange(parts.sum()) - np.repeat(np.cumsum(parts) - parts, parts)
            lo = np.maximum(starts[range_of], self.bounds[shard]) - self.bounds[shard]
            hi = np.minimum(ends[range_of], self.bounds[shard + 1]) - self.bounds[shard]
        out = np.empty(int(lengths.sum()), dtype=np.uint16)
        at = 0
        for k, a, b in zip(shard.tolist(), lo.tolist(), hi.tolist()):
            out[at : at + b - a] = self.arrays[k][a:b]
            at += b - a
        return out


class TrainTokens(TokenArray):
    """The train shards as one virtual token array, with the start of each document in it."""

    def __init__(self, shards: list[Shard]):
        super().__init__([np.asarray(s.tokens()) for s in shards])  # plain views of the memory maps slice faster
        counts = [s.num_documents() for s in shards]
        self.doc_starts = np.empty(sum(counts) + 1, dtype=np.int64)  # plus the end of the last document
        filled = 0
        for shard, base, count in zip(shards, self.bounds, counts):
            self.doc_starts[filled : filled + count] = shard.doc_starts() + base
            filled += count
        self.doc_starts[-1] = self.bounds[-1]

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1


def cut(starts: np.ndarray, lengths: np.ndarray, per_seq: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The token ranges (starts, lengths) that fill each sequence with seq_len + 1 tokens from its pieces: the first
    per_seq[0] pieces are the first sequence's, and so on; a sequence takes what it needs of its pieces in order."""
    seq_of = np.repeat(np.arange(len(per_seq)), per_seq)
    before = np.cumsum(lengths) - lengths  # tokens before each piece, counted from the first sequence
    before -= before[(np.cumsum(per_seq) - per_seq)[seq_of]]
    take = np.minimum(np.maximum(seq_len + 1 - before, 0), lengths)
    used = take > 0
    return starts[used], take[used]


class EpochOrder:
    """One epoch's document permutation and where each of its sequences starts."""

    def __init__(self, doc_starts: np.ndarray, seq_len: int, num_starts: int, seed: int, epoch: int, align: bool):
        n_docs = len(doc_starts) - 1
        self.docs = np.arange(n_docs, dtype=np.int32)
        np.random.default_rng([seed, epoch]).shuffle(self.docs)
        self.start_doc = np.empty(num_starts, dtype=np.int32)  # position in self.docs
        self.start_offset = np.empty(num_starts, dtype=np.int32)  # token offset in that document
        stream_at = 0  # tokens of the permuted stream before the current chunk
        for first in range(0, n_docs, CHUNK_DOCS):
            docs = self.docs[first : first + CHUNK_DOCS]
            lengths = doc_starts[docs + 1] - doc_starts[docs]
            ends = stream_at + np.cumsum(lengths)
            lo, hi = -(-stream_at // seq_len), min(-(-int(ends[-1]) // seq_len), num_starts)
            nominal = np.arange(lo, hi, dtype=np.int64) * seq_len  # sequence starts inside this chunk
            doc = np.searchsorted(ends, nominal, side="right")
            offset = nominal - (ends[doc] - lengths[doc])
            if align:
                offset = -(-offset // seq_len) * seq_len  # the next piece of this document...
                past_end = offset >= lengths[doc]  # ...or else the next document
                doc = doc + past_end
                offset[past_end] = 0
            # Clipping only touches the last start, which is only ever read as a bound.
            self.start_doc[lo:hi] = np.minimum(first + doc, n_docs - 1)
            self.start_offset[lo:hi] = offset
            stream_at = int(ends[-1])

    @property
    def nbytes(self) -> dict[str, int]:
        return {"documents": self.docs.nbytes, "sequences": self.start_doc.nbytes + self.start_offset.nbytes}


class ShuffledSequences:
    """One prepared dataset's training sequences, pass (epoch) after pass: see the module doc, steps 1 and 2.

    Opened lazily in the process that reads (DataLoader workers included); `keep_epochs` passes' tables are kept,
    most recent first, so that a reader that straddles two passes (a mixture's source) does not rebuild them."""

    def __init__(self, folder: Path, seq_len: int, seed: int, align_to_documents: bool = False, keep_epochs: int = 1):
        self.folder, self.seq_len, self.seed, self.align = Path(folder), seq_len, seed, align_to_documents
        self.keep_epochs = keep_epochs
        self.shards = list(split_shards(folder, read_manifest(folder), "train"))
        sizes = [len(s.tokens()) for s in self.shards]
        num_tokens = sum(sizes)
        if num_tokens == 0:
            raise ShardError(f"{folder}: no training tokens (no train shards, or only empty ones)")
        for shard in self.shards:
            if not shard.index.is_file():
                raise ShardError(f"{shard.index}: missing; shuffling needs every shard's document index")
        first = next(s for s, size in zip(self.shards, sizes) if size)
        if first.doc_starts()[:1].tolist() != [0]:
            raise ShardError(
                f"{first.path}: the first training document does not start at token 0 (shards from llm.c or "
                "modded-nanogpt: index them with python scripts/prepare_data.py data=local data.source=<their folder>)"
            )
        # Sequence s starts at or after s * seq_len; one more start bounds the last sequence's end.
        self.num_starts = (num_tokens - 1) // seq_len + 1
        # An aligned start may move up to seq_len forward, so aligned sequence s ends before start s + 2.
        self.lookahead = 2 if align_to_documents else 1
        self.num_sequences = max(self.num_starts - self.lookahead, 0)  # in each pass
        self._tokens: TrainTokens | None = None
        self._orders: list[tuple[int, EpochOrder]] = []  # the passes kept, most recently used first

    def __getstate__(self) -> dict:  # workers open their own memory maps, and read the shard list themselves
        return {**self.__dict__, "shards": None, "_tokens": None, "_orders": []}

    def sequences(self, epoch: int, seqs: np.ndarray) -> np.ndarray:
        """Sequences `seqs` (indices in the pass) of pass `epoch`: (len(seqs), seq_len + 1) uint16 tokens."""
        starts, lengths = cut(*self.pieces(epoch, seqs), self.seq_len)
        return self.tokens.read(starts, lengths).reshape(len(seqs), self.seq_len + 1)

    def pieces(self, epoch: int, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pieces of documents sequences `seqs` of pass `epoch` may read, for `cut`: their starts (positions in
        `tokens`) and lengths, and how many belong to each sequence (the first begins at the sequence's start)."""
        order = self.epoch_order(epoch)
        head, tail = order.start_doc[seqs], order.start_doc[seqs + self.lookahead]
        # Every document from a sequence's start document to its bound may contribute a piece.
        per_seq = tail.astype(np.int64) - head + 1
        first_piece = np.cumsum(per_seq) - per_seq
        seq_of = np.repeat(np.arange(len(seqs)), per_seq)
        docs = order.docs[head[seq_of] + np.arange(len(seq_of)) - first_piece[seq_of]]
        starts = self.tokens.doc_starts[docs]
        lengths = self.tokens.doc_starts[docs + 1] - starts
        starts[first_piece] += order.start_offset[seqs]
        lengths[first_piece] -= order.start_offset[seqs]
        return starts, lengths, per_seq

    @property
    def tokens(self) -> TrainTokens:
        if self._tokens is None:
            shards = self.shards or list(split_shards(self.folder, read_manifest(self.folder), "train"))
            self._tokens = TrainTokens(shards)
        return self._tokens

    def epoch_order(self, epoch: int) -> EpochOrder:
        order = next((o for e, o in self._orders if e == epoch), None)
        if order is None:
            del self._orders[self.keep_epochs - 1 :]  # free the oldest pass's tables before building the next
            order = EpochOrder(self.tokens.doc_starts, self.seq_len, self.num_starts, self.seed, epoch, self.align)
        self._orders = [(epoch, order)] + [(e, o) for e, o in self._orders if e != epoch]
        return order

    def forget_before(self, epoch: int) -> None:
        """Drop the tables of passes before `epoch`: a reader that has moved on needs only one pass's."""
        self._orders = [(e, o) for e, o in self._orders if e >= epoch]

    def index_nbytes(self, epoch: int = 0) -> dict[str, int]:
        """Bytes held for the index: per-document arrays (and how many documents), per-sequence arrays."""
        nbytes = self.epoch_order(epoch).nbytes
        return {
            "num_documents": self.tokens.num_documents,
            "document_bytes": self.tokens.doc_starts.nbytes + nbytes["documents"],
            "num_sequences": self.num_starts,
            "sequence_bytes": nbytes["sequences"],
        }


class ShuffledBatches(Dataset):
    """Item i: micro-batch i of rank `rank`, from documents shuffled anew each epoch (see module doc)."""

    def __init__(
        self,
        folder: Path,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        align_to_documents: bool = False,
        accumulation: int = 1,  # micro-batches per optimizer step: an epoch is a whole number of steps
    ):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.stream = ShuffledSequences(folder, seq_len, seed, align_to_documents)
        sequences = self.stream.num_sequences
        self.batches_per_epoch = epoch_batches(sequences, batch_size, world_size, accumulation)
        if self.batches_per_epoch == 0:
            raise ShardError(f"{folder}: {too_few(sequences, seq_len, batch_size, world_size, accumulation)}")

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, batch = divmod(i, self.batches_per_epoch)
        first = (batch * self.world_size + self.rank) * self.batch_size
        seqs = np.arange(first, first + self.batch_size)
        rows = torch.from_numpy(self.stream.sequences(epoch, seqs).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def index_nbytes(self, epoch: int = 0) -> dict[str, int]:
        return self.stream.index_nbytes(epoch)
