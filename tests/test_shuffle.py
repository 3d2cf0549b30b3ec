"""The document-shuffling training dataset: coverage, determinism, ranks, exact resume, memory."""

import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gptlab.data import shuffle
from gptlab.data.loader import RangeSampler
from gptlab.data.shards import ShardError, write_manifest, write_shard
from gptlab.data.shuffle import ShuffledBatches

SEQ_LEN = 16


def write_folder(folder, doc_lengths, shard_tokens, val_tokens=50):
    """Pack documents into train shards (documents run on across shard ends) plus one val shard.

    Train token g has the value g (mod 2**16), so in a small corpus every token says which document it
    belongs to and where. Returns the global start of every document.
    """
    folder.mkdir(exist_ok=True)
    starts = np.cumsum([0, *doc_lengths])
    total = int(starts[-1])
    entries = []
    for index, base in enumerate(range(0, total, shard_tokens)):
        tokens = np.arange(base, min(base + shard_tokens, total)) % 2**16
        local = starts[(starts >= base) & (starts < base + len(tokens))] - base
        entries.append(shard_entry(folder, "train", index, tokens, local))
    if val_tokens:
        entries.append(shard_entry(folder, "val", 0, np.full(val_tokens, 65000), np.array([0])))
    write_manifest(folder, {"shards": entries})
    return starts[:-1]


def shard_entry(folder, split, index, tokens, doc_starts):
    name = f"{split}_{index:06d}.bin"
    sha = write_shard(folder / name, tokens, doc_starts)
    return {"file": name, "split": split, "tokens": len(tokens), "documents": len(doc_starts), "sha256": sha}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Build epoch tables a few documents at a time, so that chunk boundaries are exercised."""
    monkeypatch.setattr(shuffle, "CHUNK_DOCS", 7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~120 documents of 2 to 120 tokens, two much longer ones, in shards of 500 tokens."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 120, size=120)
    lengths[[10, 70]] = (700, 1200)  # longer than a shard: spans two or three shard ends
    folder = tmp_path_factory.mktemp("shuffle")
    starts = write_folder(folder, lengths, shard_tokens=500)
    return folder, starts, int(lengths.sum())


def epoch_sequences(folder, epoch=0, seed=0, **kw):
    """All sequences of one epoch, in order, from a single-process dataset with micro-batches of 1."""
    ds = ShuffledBatches(folder, SEQ_LEN, 1, seed, **kw)
    items = [ds[i] for i in range(epoch * len(ds), (epoch + 1) * len(ds))]
    x, y = torch.cat([x for x, _ in items]), torch.cat([y for _, y in items])
    assert torch.equal(x[:, 1:], y[:, :-1])
    return x, y


def document_order(stream, starts):
    """The documents of a token stream in order, checking that each is read contiguously from its start
    (the first one may start later: a stream can begin inside a document)."""
    doc = np.searchsorted(starts, stream, side="right") - 1
    first = np.flatnonzero(np.diff(doc, prepend=-1))
    order = doc[first].tolist()
    assert len(set(order)) == len(order), "a document appears in two places"
    begin = [stream[0], *starts[order[1:]]]
    for d, a, b, t in zip(order, first, [*first[1:], len(stream)], begin):
        assert stream[a:b].tolist() == list(range(t, t + b - a)), "a document is cut or reordered"
    return order


def check_epoch_covers_every_token_once(folder, starts, total, epoch=0, seed=0):
    x, y = epoch_sequences(folder, epoch, seed)
    assert torch.equal(x[1:, 0], y[:-1, -1])  # stride seq_len: a sequence's last target starts the next
    stream = x.flatten().numpy()
    assert len(stream) == (total - 1) // SEQ_LEN * SEQ_LEN
    rest = np.setdiff1d(np.arange(total), stream)
    assert len(rest) == total - len(stream) and np.intersect1d(rest, stream).size == 0
    order = document_order(stream, starts)
    assert stream[0] == starts[order[0]]
    # What is left over is the end of the last document read and the documents never reached.
    unread = sorted(set(range(len(starts))) - set(order))
    last_end = starts[order[-1] + 1] if order[-1] + 1 < len(starts) else total
    assert rest.tolist() == sorted([*range(int(stream[-1]) + 1, last_end), *tokens_of(unread, starts, total)])
    return order


def tokens_of(docs, starts, total):
    ends = [*starts[1:], total]
    return [t for d in docs for t in range(starts[d], ends[d])]


def test_an_epoch_reads_every_token_once_with_documents_whole(corpus):
    order = check_epoch_covers_every_token_once(*corpus)
    assert order != sorted(order)


def test_documents_are_shuffled_across_shards(corpus):
    folder, starts, total = corpus
    order = check_epoch_covers_every_token_once(*corpus)
    shard_of = [int(starts[d]) // 500 for d in order]
    changes = sum(a != b for a, b in zip(shard_of, shard_of[1:]))
    assert changes > len(order) // 2  # not shard by shard: neighbours mostly come from different shards


def test_order_depends_on_seed_and_epoch_only(corpus):
    folder, starts, total = corpus
    x0, _ = epoch_sequences(folder, seed=0)
    assert torch.equal(x0, epoch_sequences(folder, seed=0)[0])
    assert not torch.equal(x0, epoch_sequences(folder, seed=1)[0])
    epoch0 = check_epoch_covers_every_token_once(*corpus, epoch=0)
    epoch1 = check_epoch_covers_every_token_once(*corpus, epoch=1)
    assert epoch0 != epoch1


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_parts_of_the_single_process_epoch(corpus, world_size):
    folder = corpus[0]
    single, _ = epoch_sequences(folder)
    B = 2
    ranks = [ShuffledBatches(folder, SEQ_LEN, B, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(ds) for ds in ranks}) == 1
    dealt = torch.cat([ranks[r][i][0] for i in range(len(ranks[0])) for r in range(world_size)])
    assert torch.equal(dealt, single[: len(dealt)])
    assert len(dealt) > len(single) - B * world_size


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # worker processes: slow
def test_resuming_at_batch_k_continues_token_for_token(corpus, num_workers):
    ds = ShuffledBatches(corpus[0], SEQ_LEN, 4, seed=3, rank=1, world_size=2)
    stop, k = 2 * len(ds) + 3, len(ds) - 2  # resume just before an epoch ends, run into the third
    full = list(DataLoader(ds, batch_size=None, sampler=RangeSampler(0, stop)))
    resumed = ShuffledBatches(corpus[0], SEQ_LEN, 4, seed=3, rank=1, world_size=2)
    loader = DataLoader(resumed, batch_size=None, sampler=RangeSampler(k, stop), num_workers=num_workers)
    tail = list(loader)
    assert len(tail) == stop - k
    for (x, y), (rx, ry) in zip(full[k:], tail):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert x.dtype == torch.int64 and x.shape == (4, SEQ_LEN)


def test_pickles_without_its_tables(corpus):
    ds = ShuffledBatches(corpus[0], SEQ_LEN, 2, seed=0)
    x, _ = ds[5]
    copy = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 2000 and copy.stream._tokens is None and copy.stream._orders == []
    assert torch.equal(copy[5][0], x)


def test_index_memory_stays_within_budget(tmp_path, monkeypatch):
    """At most 16 bytes per document and 8 per sequence, also while building (measured by tracemalloc)."""
    monkeypatch.setattr(shuffle, "CHUNK_DOCS", 4096)
    lengths = np.random.default_rng(1).integers(1, 20, size=300_000)
    write_folder(tmp_path, lengths, shard_tokens=1_000_000, val_tokens=0)
    tracemalloc.start()
    ds = ShuffledBatches(tmp_path, 8, 4, seed=0)
    ds[len(ds) - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    index = ds.index_nbytes()
    assert index["num_documents"] == len(lengths) and index["num_sequences"] == ds.stream.num_starts
    assert index["document_bytes"] <= 16 * index["num_documents"]
    assert index["sequence_bytes"] <= 8 * index["num_sequences"]
    assert peak <= 16 * index["num_documents"] + 8 * index["num_sequences"] + 2**20


def test_aligned_sequences_start_at_documents_or_their_pieces(corpus):
    folder, starts, total = corpus
    x, _ = epoch_sequences(folder, align_to_documents=True)
    assert len(x) == (total - 1) // SEQ_LEN - 1  # one sequence fewer than unaligned, whatever the order
    first = x[:, 0].numpy()
    doc = np.searchsorted(starts, first, side="right") - 1
    assert ((first - starts[doc]) % SEQ_LEN == 0).all()
    # Each sequence is a run of the same permuted stream as the unaligned epoch.
    order = document_order(epoch_sequences(folder)[0].flatten().numpy(), starts)
    rank_of = {d: r for r, d in enumerate(order)}
    for row in x.numpy():
        seen = document_order(row, starts)
        assert [rank_of[d] for d in seen] == list(range(rank_of[seen[0]], rank_of[seen[0]] + len(seen)))
    # A long document is read in consecutive pieces, seq_len apart, each starting a sequence; its own
    # start is skipped when no grid point falls between it and the previous document's last start.
    for long_doc, length in ((10, 700), (70, 1200)):
        pieces = np.flatnonzero(doc == long_doc)
        offsets = (first[pieces] - starts[long_doc]).tolist()
        assert offsets[0] in (0, SEQ_LEN) and offsets == list(range(offsets[0], length, SEQ_LEN))
        assert np.diff(pieces).tolist() == [1] * (len(pieces) - 1)
    # Starts move forward by less than seq_len, and most tokens are read exactly once.
    assert np.unique(x).size > 0.9 * total


def test_clear_errors_for_too_little_data(tmp_path):
    write_folder(tmp_path / "none", [], shard_tokens=100)
    with pytest.raises(ShardError, match="no training tokens"):
        ShuffledBatches(tmp_path / "none", SEQ_LEN, 1, seed=0)
    write_folder(tmp_path / "few", [40, 30], shard_tokens=100)
    with pytest.raises(ShardError, match="4 training sequences .* too few for one micro-batch of 3 on each of 2"):
        ShuffledBatches(tmp_path / "few", SEQ_LEN, 3, seed=0, world_size=2)
    write_folder(tmp_path / "headless", [40, 30], shard_tokens=100)
    write_shard(tmp_path / "headless" / "train_000000.bin", np.arange(70), np.array([40]))
    with pytest.raises(ShardError, match="first training document does not start at token 0"):
        ShuffledBatches(tmp_path / "headless", SEQ_LEN, 1, seed=0)
    (tmp_path / "headless" / "train_000000.idx").unlink()
    with pytest.raises(ShardError, match="train_000000.idx: missing"):
        ShuffledBatches(tmp_path / "headless", SEQ_LEN, 1, seed=0)
