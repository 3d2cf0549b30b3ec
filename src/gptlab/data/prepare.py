"""Turn a data source into a folder of token shards plus manifest.json (format: gptlab.data.shards).

Documents stream from gptlab.data.sources in a fixed order; worker processes tokenize batches of them
and the main process packs the ids, in source order, into shards of exactly `shard_tokens` tokens (the
last shard of a split may be shorter, and a document may continue in the next shard). Nothing depends on
the number of workers, so any number writes the same bytes.

Resuming: after each finished shard, that split's progress (how far into the source it got, its counts
and finished shards) is saved to prepare_state.json. Rerun with the same settings, a prepare verifies
those shards, skips the source documents they hold and writes what an uninterrupted run would have.
manifest.json is written last: its presence marks a finished dataset.

A prepare writes only into an empty (or new) folder or one holding an unfinished prepare: never into a folder
that holds anything else. data.source naming `.bin` token shards (llm.c, modded-nanogpt) is indexed in place
instead of tokenized (gptlab.data.index).
"""

import hashlib
import json
import multiprocessing
import platform
import re
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.data import sources
from gptlab.data.config import DataConfig, PrepareConfig
from gptlab.data.shards import (
    MANIFEST,
    read_manifest,
    shard_name,
    write_manifest,
    write_shard,
)
from gptlab.data.sources import COUNTS, Stream
from gptlab.data.tokenizer import EOT, RANKS_SHA256, gpt2_tokenizer
from gptlab.errors import ConfigError, DataError
from gptlab.files import atomic_write_bytes, sha256_of

SPLITS = ("train", "val")
STATE = "prepare_state.json"  # the progress of an unfinished prepare; removed once manifest.json is written
BATCH_CHARS = 1 << 20  # text per tokenizer task: large enough to amortize sending it to a worker
BATCH_DOCS = 4096  # documents per task, whatever their size (most may be filtered out)
# What an unfinished prepare leaves in its folder: shards, their indexes, its state, atomic writes' temporary files
PREPARE_FILE = re.compile(r"(train|val)_\d{6}\.(bin|idx)|" + re.escape(STATE) + r"|\..+\.tmp\d+")


def prepare_dataset(cfg: DataConfig) -> dict:
    """Tokenize cfg.source into shards in cfg.dir and return the manifest. An interrupted prepare is
    resumed; a finished one (manifest.json present) is left alone."""
    folder = Path(cfg.dir)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder)
    from gptlab.data import index

    if index.is_token_shards(cfg):  # already tokenized: index them in place
        return index.index_dataset(cfg)
    check_writable(folder)
    streams = sources.streams(cfg)
    origins = {"+".join(s.splits): s.origin for s in streams}  # which hub split / files fed which split
    source = {
        "name": cfg.name,
        "source": cfg.source,
        "hub_config": cfg.hub_config,
        "text_field": cfg.text_field,
        "id_field": cfg.id_field,
        "splits" if sources.is_hub_id(cfg.source) else "files": origins,
    }
    return write_dataset(folder, streams, source, cfg.prepare, cfg.val_fraction)


def write_dataset(
    folder: Path, streams: list[Stream], source: dict, prepare: PrepareConfig, val_fraction: float
) -> dict:
    """Tokenize the streams' documents into shards in `folder`, resuming from its saved progress, and
    write the manifest (`source` describes where the documents came from)."""
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp*"):  # a crash inside atomic_write_bytes leaves its temporary file
        leftover.unlink()
    settings = {  # the manifest's header; a resumed prepare must have the same
        "format": "llm.c token shards (gptlab)",
        "source": source,
        "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "eot": EOT},
        "val_fraction": val_fraction,
        "prepare": {
            "max_docs": prepare.max_docs,
            "max_tokens": prepare.max_tokens,
            "shard_tokens": prepare.shard_tokens,
            "filters": [asdict(f) for f in prepare.filters],
        },
        "python": platform.python_version(),
    }
    with worker_pool(prepare.workers) as pool, tqdm(desc=f"Tokenizing into {folder.name}", unit=" docs") as bar:
        writer = DatasetWriter(folder, settings, prepare, pool, bar)
        for stream in streams:
            writer.write_stream(stream, val_fraction)
    manifest = settings | {
        "documents": writer.counts,
        "shards": [entry for split in SPLITS for entry in writer.splits[split].entries],
    }
    write_manifest(folder, manifest)  # written last: its presence marks a finished dataset
    (folder / STATE).unlink()
    return manifest


def foreign_files(folder: Path, ours: re.Pattern) -> list[str]:
    """The names in `folder` that `ours` does not match (folders end with "/"): what gptlab did not write there."""
    if not folder.is_dir():
        return [] if not folder.exists() else [folder.name]
    return sorted(p.name + "/" * p.is_dir() for p in folder.iterdir() if not ours.fullmatch(p.name) or p.is_dir())


def shown(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_writable(folder: Path) -> None:
    """Refuse a folder that holds anything but an unfinished prepare: a dataset never overwrites other files."""
    foreign = foreign_files(folder, PREPARE_FILE)
    if foreign:
        raise ConfigError(
            "data.dir",
            f"{folder} holds other files ({shown(foreign)}) and no {MANIFEST}: gptlab prepares a dataset only into "
            "an empty or new folder, or one it was preparing; set data.dir to another folder",
        )


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A stable, order-independent split: a document's id alone decides where it goes."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def tokenize(texts: list[str]) -> list[np.ndarray]:
    """GPT-2 ids of each text, preceded by <|endoftext|> (one core: parallelism comes from processes)."""
    encoder = gpt2_tokenizer()
    return [np.array([EOT, *encoder.encode_ordinary(text)], dtype=np.uint16) for text in texts]


# ---- packing ids into shards


class SplitWriter:
    """Packs one split's documents into shards of exactly `shard_tokens` tokens (the last one may be
    shorter); a document that does not fit continues in the next shard, as in build-nanogpt."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, finished: Iterable[dict] = ()):
        self.folder, self.split = folder, split
        self.entries = list(finished)  # manifest entries of the shards written so far
        self.tokens = sum(e["tokens"] for e in self.entries)  # all tokens added, the buffered ones included
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled, self.starts = 0, []  # tokens in the buffer; offsets of the documents that start there

    def add(self, ids: np.ndarray, starts_document: bool = True) -> bool:
        """Append a document's ids (starts_document=False: the rest of a document begun in an earlier
        shard). Returns whether a shard was finished."""
        if starts_document:
            self.starts.append(self.filled)
        self.tokens += len(ids)
        finished = False
        while len(ids):
            take = min(len(ids), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + take] = ids[:take]
            self.filled, ids = self.filled + take, ids[take:]
            if self.filled == len(self.buffer):
                self.flush()
                finished = True
        return finished

    def flush(self) -> None:
        """Write the buffered tokens as the next shard."""
        if not self.filled:
            return
        name = shard_name(self.split, len(self.entries))
        sha = write_shard(self.folder / name, self.buffer[: self.filled], np.array(self.starts, dtype=np.int64))
        self.entries.append(
            {"file": name, "split": self.split, "tokens": self.filled, "documents": len(self.starts), "sha256": sha}
        )
        self.filled, self.starts = 0, []


def write_split(folder: Path, split: str, docs: Iterable[np.ndarray], shard_tokens: int) -> list[dict]:
    """Pack tokenized documents into shards of `shard_tokens`; return their manifest entries."""
    writer = SplitWriter(folder, split, shard_tokens)
    for doc in docs:
        writer.add(doc)
    writer.flush()
    return writer.entries


# ---- a resumable prepare


@dataclass
class Progress:
    """How far one split got, saved after each of its finished shards. Its `shards` and `counts` hold
    every document of the stream before `position` that went to this split, and, when `written` > 0,
    the first `written` tokens of document `position` too (the shard ended inside it)."""

    position: int = 0
    written: int = 0
    done: bool = False  # the split's stream was read to its end (or its limit) and its last shard written
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    shards: list = field(default_factory=list)


@dataclass(slots=True)
class Item:
    """A document on its way to a shard."""

    position: int  # in its stream
    split: str
    verdict: str  # one of COUNTS
    text: str | None  # kept documents only
    cut: int = 0  # tokens of it already in a finished shard (a resumed prepare continues it)


class DatasetWriter:
    """Writes the splits of one dataset folder in source order, saving its progress after every shard."""

    def __init__(self, folder: Path, settings: dict, prepare: PrepareConfig, pool: Pool | None, bar: tqdm):
        self.folder, self.settings, self.prepare, self.pool, self.bar = folder, settings, prepare, pool, bar
        self.progress = load_progress(folder, settings)
        self.splits = {s: SplitWriter(folder, s, prepare.shard_tokens, p.shards) for s, p in self.progress.items()}
        self.counts = {s: dict(p.counts) for s, p in self.progress.items()}
        self.tokens_at_start = self.total_tokens()

    def write_stream(self, stream: Stream, val_fraction: float) -> None:
        if all(self.progress[s].done for s in stream.splits):
            return
        limited = stream.splits[0]  # max_docs and max_tokens count train documents (val ones in a val stream)
        items = self.pending_items(stream, val_fraction)
        with closing(tokenized(batched(items), self.pool, self.prepare.workers)) as results:
            for batch, ids in results:
                reached_limit = self.write_batch(batch, ids, limited)
                self.bar.update(len(batch))
                self.bar.set_postfix_str(self.rate(), refresh=False)
                if reached_limit:
                    break
        for split in stream.splits:  # the last shards, saved at once: no split of a stream is done without the others
            self.splits[split].flush()
            self.record(split, position=0, written=0, done=True)
        self.save()

    def pending_items(self, stream: Stream, val_fraction: float) -> Iterator[Item]:
        """The stream's documents that are not yet in finished shards, with their split and verdict."""
        resume = {s: self.progress[s] for s in stream.splits}
        start = min(p.position for p in resume.values())
        for position, doc in enumerate(stream.read(start), start):
            if len(stream.splits) == 1:
                split = stream.splits[0]
            else:
                split = "val" if is_validation(doc.doc_id, val_fraction) else "train"
            saved = resume[split]
            if position < saved.position:  # this split had it before the interruption
                continue
            verdict = sources.verdict(doc, self.prepare.filters)
            cut = saved.written if position == saved.position else 0
            yield Item(position, split, verdict, doc.text if verdict == "kept" else None, cut)

    def write_batch(self, batch: list[Item], ids: list[np.ndarray], limited: str) -> bool:
        """Count and write a tokenized batch in order; True once `limited` reached max_docs or max_tokens."""
        doc_ids = iter(ids)
        for item in batch:
            if not item.cut:  # a cut document was counted before the interruption
                self.counts[item.split][item.verdict] += 1
            if item.verdict != "kept":
                continue
            tokens = next(doc_ids)
            writer = self.splits[item.split]
            if writer.add(tokens[item.cut :], starts_document=not item.cut):
                if writer.filled:  # the shard ended inside this document: resume in it
                    self.record(item.split, item.position, written=len(tokens) - writer.filled)
                else:
                    self.record(item.split, item.position + 1, written=0)
                self.save()
            if item.split == limited and self.reached_limit(limited):
                return True
        return False

    def reached_limit(self, split: str) -> bool:
        max_docs, max_tokens = self.prepare.max_docs, self.prepare.max_tokens
        return (max_docs is not None and self.counts[split]["kept"] >= max_docs) or (
            max_tokens is not None and self.splits[split].tokens >= max_tokens
        )

    def record(self, split: str, position: int, written: int, done: bool = False) -> None:
        """Note how far `split` got, for the next save()."""
        shards = list(self.splits[split].entries)
        self.progress[split] = Progress(position, written, done, dict(self.counts[split]), shards)

    def save(self) -> None:
        state = {"settings": self.settings, "progress": {s: asdict(p) for s, p in self.progress.items()}}
        atomic_write_bytes(self.folder / STATE, json.dumps(state).encode())

    def total_tokens(self) -> int:
        return sum(w.tokens for w in self.splits.values())

    def rate(self) -> str:
        tokens, elapsed = self.total_tokens(), self.bar.format_dict["elapsed"]
        return f"{tokens:,} tokens, {(tokens - self.tokens_at_start) / max(elapsed, 1e-9):,.0f} tokens/s"


def load_progress(folder: Path, settings: dict) -> dict[str, Progress]:
    """The saved progress of an interrupted prepare with these settings, its shards verified; else a fresh start."""
    fresh = {split: Progress() for split in SPLITS}
    path = folder / STATE
    if not path.is_file():
        return fresh
    state = json.loads(path.read_text())
    if state["settings"] != settings:
        raise DataError(
            f"{folder} holds an unfinished prepare of another source or other settings (see {path}); "
            "prepare into another data.dir, or delete the folder to start over"
        )
    progress = {split: Progress(**saved) for split, saved in state["progress"].items()}
    entries = [entry for p in progress.values() for entry in p.shards]
    for entry in entries:
        shard = folder / entry["file"]
        if not (shard.is_file() and shard.with_suffix(".idx").is_file() and sha256_of(shard) == entry["sha256"]):
            tqdm.write(f"{shard} is not the shard {STATE} recorded: preparing from the start", file=sys.stderr)
            return fresh
    tqdm.write(f"Resuming an interrupted prepare: {len(entries)} finished shards verified", file=sys.stderr)
    return progress


# ---- tokenizing in worker processes


def batched(items: Iterable[Item]) -> Iterator[list[Item]]:
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += len(item.text or "")
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@contextmanager
def worker_pool(workers: int) -> Iterator[Pool | None]:
    """`workers` tokenizer processes (none for one: tokenize in this process). Forked before any source is
    opened, so they inherit no reader threads (pyarrow's, the Hub client's); spawned ones would re-import
    the entry script, torch included, which takes seconds."""
    if workers == 1:
        yield None
        return
    # Ctrl-C is for the main process: it stops the workers itself, without a traceback from each.
    with multiprocessing.get_context("fork").Pool(workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) as pool:
        yield pool


def tokenized(
    batches: Iterable[list[Item]], pool: Pool | None, workers: int
) -> Iterator[tuple[list[Item], list[np.ndarray]]]:
    """Each batch with the ids of its kept documents, in order."""
    if pool is None:
        for batch in batches:
            yield batch, tokenize(kept_texts(batch))
        return
    # apply_async with a bounded window instead of Pool.imap: imap reads its input from a pool thread,
    # where a source error would surface out of order; here the source is read in this thread, just ahead.
    pending = deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(tokenize, (kept_texts(batch),))))
        if len(pending) > 2 * workers:
            done, result = pending.popleft()
            yield done, result.get()
    for done, result in pending:
        yield done, result.get()


def kept_texts(batch: list[Item]) -> list[str]:
    return [item.text for item in batch if item.text is not None]
