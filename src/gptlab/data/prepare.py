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
that holds anything else, nor into one holding a dataset (finished or not) of another source or other settings.
It locks the folder meanwhile (gptlab.locks): a second prepare into it fails at once. A source that yields no
usable document, or a split left empty, is an error, and nothing is left that would pass for a dataset.
data.source naming `.bin` token shards (llm.c, modded-nanogpt) is indexed in place instead of tokenized
(gptlab.data.index).
"""

import hashlib
import json
import math
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

from gptlab.data import index, sources
from gptlab.data.config import DataConfig, PrepareConfig
from gptlab.data.sample_corpus import BUILT_IN
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
from gptlab.locks import LOCK_FILE, FolderLock

SPLITS = ("train", "val")
STATE = "prepare_state.json"  # the progress of an unfinished prepare; removed once manifest.json is written
BATCH_CHARS = 1 << 20  # text per tokenizer task: large enough to amortize sending it to a worker
BATCH_DOCS = 4096  # documents per task, whatever their size (most may be filtered out)
UNKNOWN = object()  # a setting a prepare cannot tell now (the files of a source no longer there): not compared
# What an unfinished prepare leaves in its folder: shards, their indexes, its state, its lock, atomic writes'
# temporary files
PREPARE_FILE = re.compile(rf"(train|val)_\d{{6}}\.(bin|idx)|{re.escape(STATE)}|{re.escape(LOCK_FILE)}|\..+\.tmp\d+")


def prepare_dataset(cfg: DataConfig) -> dict:
    """Tokenize cfg.source into shards in cfg.dir (or index the token shards it names) and return the manifest.
    The folder is locked meanwhile. An interrupted prepare is resumed; a finished one (manifest.json present) is
    left alone, if it holds the dataset cfg describes."""
    with lock_folder(cfg):
        return existing_manifest(cfg) or build_dataset(cfg)


def lock_folder(cfg: DataConfig) -> FolderLock:
    """The lock of cfg.dir for preparing it (to use in a `with`). A folder holding other files, or a source that
    names no files, is refused first, before anything (the lock file, the folder) is written."""
    folder = Path(cfg.dir)
    if not (folder / MANIFEST).is_file():
        if index.is_token_shards(cfg):
            index.check_folder(cfg)
        else:
            check_writable(folder)
            if cfg.name not in BUILT_IN:  # (a built-in corpus takes seconds to list, and is always there)
                sources.streams(cfg)
    return FolderLock(folder, f"preparing {cfg.name}")


def existing_manifest(cfg: DataConfig) -> dict | None:
    """The manifest of cfg.dir if it holds the dataset cfg describes; None if it holds no finished dataset; an
    error naming the first setting that differs if it holds another."""
    folder = Path(cfg.dir)
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    refuse_other(folder, manifest, expected_header(cfg), "a dataset")
    return manifest


def build_dataset(cfg: DataConfig) -> dict:
    """Write the dataset cfg describes into cfg.dir, which holds no finished one (the caller holds its lock)."""
    if index.is_token_shards(cfg):  # already tokenized: index them in place
        return index.index_dataset(cfg)
    return write_dataset(cfg, sources.streams(cfg))


def expected_header(cfg: DataConfig) -> dict:
    """The settings a prepare of cfg records in its manifest (without the files, when they cannot be listed now:
    a prepared dataset outlives its source)."""
    if index.is_token_shards(cfg):
        return index.header(cfg)
    try:
        streams = sources.streams(cfg)
    except DataError:
        streams = None
    return dataset_settings(cfg, streams)


def dataset_settings(cfg: DataConfig, streams: list[Stream] | None) -> dict:
    """The manifest's header: where the documents come from and every setting that decides the shards' bytes
    (a resumed prepare must have the same)."""
    source = {
        "name": cfg.name,
        "source": cfg.source,
        "hub_config": cfg.hub_config,
        "text_field": cfg.text_field,
        "id_field": cfg.id_field,
    }
    if streams is None:  # files that cannot be listed now (only compared, never written)
        origins = {"val": UNKNOWN, "train": UNKNOWN} if cfg.val_source is not None else {"train+val": UNKNOWN}
    else:  # which hub split / files fed which split
        origins = {"+".join(s.splits): s.origin for s in streams}
    source["splits" if sources.is_hub_id(cfg.source) else "files"] = origins
    p = cfg.prepare
    return {
        "format": "llm.c token shards (gptlab)",
        "source": source,
        "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "eot": EOT},
        "val_fraction": cfg.val_fraction,
        "prepare": {
            "max_docs": p.max_docs,
            "max_tokens": p.max_tokens,
            "shard_tokens": p.shard_tokens,
            "filters": [asdict(f) for f in p.filters],
        },
        "python": platform.python_version(),
    }


def write_dataset(cfg: DataConfig, streams: list[Stream]) -> dict:
    """Tokenize the streams' documents into shards in cfg.dir, resuming from its saved progress, and write the
    manifest. A dataset training could not use (no document kept, an empty split) is an error, and what was
    written is removed."""
    folder = Path(cfg.dir)
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp*"):  # a crash inside atomic_write_bytes leaves its temporary file
        leftover.unlink()
    settings = dataset_settings(cfg, streams)
    with worker_pool(cfg.prepare.workers) as pool, tqdm(desc=f"Tokenizing into {folder.name}", unit=" docs") as bar:
        writer = DatasetWriter(folder, settings, cfg.prepare, pool, bar)
        for stream in streams:
            writer.write_stream(stream, cfg.val_fraction)
    try:
        check_usable(cfg, streams, writer)
    except DataError:
        discard(folder)
        raise
    manifest = settings | {
        "documents": writer.counts,
        "shards": [entry for split in SPLITS for entry in writer.splits[split].entries],
    }
    write_manifest(folder, manifest)  # written last: its presence marks a finished dataset
    (folder / STATE).unlink()
    return manifest


# ---- refusing what training could not use, or a folder of another dataset


def check_usable(cfg: DataConfig, streams: list[Stream], writer: "DatasetWriter") -> None:
    """Refuse a stream that gave no document with text, and a held-out split left empty (training needs both)."""
    for stream in streams:
        counts = {key: sum(writer.counts[split][key] for split in stream.splits) for key in COUNTS}
        if not counts["kept"]:
            where = cfg.val_source if stream.splits == ("val",) else cfg.source
            dropped = [f"{n:,} {WHY[key]}" for key, n in counts.items() if n]
            why = f"of {sum(counts.values()):,}: {', '.join(dropped)}" if dropped else "it holds none"
            raise DataError(f"{where}: no documents with text ({why}); nothing was prepared")
    kept = {split: writer.counts[split]["kept"] for split in SPLITS}
    if kept["val"] and kept["train"]:
        return
    held_out = f"data.val_fraction={cfg.val_fraction:g} held out {kept['val']:,} of the {sum(kept.values()):,} "
    held_out += f"documents kept from {cfg.source}"
    if not kept["val"] and kept["train"] > 1 and writer.lowest[0] < 1:  # (none seen: all were in resumed shards)
        fraction = short_number_between(*writer.lowest)
        fix = f"set data.val_fraction={fraction:g} (holds out at least one)"
    else:
        fix = "add documents"
    raise DataError(
        f"the {'validation' if not kept['val'] else 'training'} split is empty: {held_out}; {fix}, or give the "
        "validation documents in data.val_source (training needs both splits)"
    )


WHY = {"filtered": "filtered out by data.prepare.filters", "skipped_empty": "empty", "skipped_non_utf8": "not UTF-8"}


def short_number_between(low: float, high: float) -> float:
    """The number with the fewest decimals in (low, high): a val_fraction that holds out the document whose
    hash bucket is `low` and keeps the one at `high`."""
    for digits in range(1, 18):
        value = math.ceil(low * 10**digits) / 10**digits
        if low < value < high:
            return value
    return (low + high) / 2


def discard(folder: Path) -> None:
    """Remove the shards, indexes and progress of a refused prepare: nothing half prepared is left behind."""
    for path in folder.iterdir():
        if PREPARE_FILE.fullmatch(path.name) and path.name != LOCK_FILE:
            path.unlink()


def refuse_other(folder: Path, have: dict, want: dict, what: str) -> None:
    """Refuse `folder`, whose manifest (or unfinished prepare's state) records `have`, for a prepare that would
    record `want`, if a setting that decides the shards differs: name the first one."""
    wanted = settings_by_key(want)
    for (key, there), (_, here) in zip(settings_by_key(have), wanted):
        if here is not UNKNOWN and there != here:
            raise DataError(
                f"{folder} holds {what} of another source or other settings ({key}: {brief(there)} there, "
                f"{brief(here)} in this prepare); set data.dir to another folder, or delete {folder} to prepare "
                "it again"
            )


def settings_by_key(header: dict) -> list[tuple[str, object]]:
    """A manifest's (or prepare state's) settings as (the data key that decides it, its value), in the order a
    message names the first difference. The Python version is left out: it changes no token of a source's."""
    source = header.get("source") or {}
    kind = "token shards indexed in place" if header.get("format") == index.FORMAT else "tokenized documents"
    origins = source.get("splits", source.get("files")) or {}  # none for token shards
    train_origin, val_origin = origins.get("train+val", origins.get("train")), origins.get("val")
    hub_split = "splits" in source and source.get("name") not in BUILT_IN
    return [
        ("the kind of dataset", kind),
        ("data.source", source.get("source")),
        ("data.hub_config", source.get("hub_config")),
        ("data.train_split" if hub_split else "the documents of data.source", train_origin),
        ("data.val_source", val_origin),
        ("data.val_fraction", header.get("val_fraction") if val_origin is None else None),  # unused with val files
        ("data.text_field", source.get("text_field")),
        ("data.id_field", source.get("id_field")),
        ("the shards' folder", source.get("folder")),  # token shards indexed in place
        *((f"data.prepare.{key}", value) for key, value in (header.get("prepare") or {}).items()),
        ("the tokenizer", header.get("tokenizer")),
        ("data", source.get("name")),
    ]


def brief(value) -> str:
    """A setting's value in a one-line message."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return f"{len(value):,} file(s): {shown(value, 2)}"
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


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
    return id_bucket(doc_id) < val_fraction


def id_bucket(doc_id: str) -> float:
    """A number in [0, 1) drawn from the hash of a document's id: val_fraction holds out the documents below it."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


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
        self.lowest = [1.0, 1.0]  # the two lowest id buckets of kept training documents seen (for a val_fraction)

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
            bucket = id_bucket(doc.doc_id) if len(stream.splits) > 1 else None
            if bucket is None:
                split = stream.splits[0]
            else:
                split = "val" if bucket < val_fraction else "train"
            saved = resume[split]
            if position < saved.position:  # this split had it before the interruption
                continue
            verdict = sources.verdict(doc, self.prepare.filters)
            if bucket is not None and split == "train" and verdict == "kept":
                self.lowest = sorted([*self.lowest, bucket])[:2]
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
    refuse_other(folder, state["settings"], settings, "an unfinished prepare")
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
    with multiprocessing.get_context("fork").Pool(workers, quiet_worker) as pool:
        yield pool


def quiet_worker() -> None:
    """Ctrl-C and SIGTERM are for the main process: it stops the workers itself (Pool.terminate, a SIGTERM), with no
    traceback from each. A worker ignores Ctrl-C, and dies silently of SIGTERM, whatever handler it was forked with."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
