"""Token shards written by llm.c or modded-nanogpt, used as a gptlab dataset without re-tokenizing them.

`python scripts/prepare_data.py data=local data.source=<folder of .bin shards>` indexes them (prepare_dataset
comes here whenever data.source names `.bin` files): every shard is read once, its header and size checked,
its sha256 taken and the position of each <|endoftext|> (where documents start) written to `<shard>.idx`;
then manifest.json. Nothing is re-tokenized and the shards are never written.

Where: into data.dir (gptlab's data folder, `data/local` by default), the manifest naming the shards by
absolute path; the shards' folder is left untouched. data.dir set to the shards' own folder asks for the
index beside them instead (manifest.json and one .idx per shard, names relative: the folder can move).

Their layout: `<name>_val_000000.bin`, `<name>_train_000001.bin`, ... (llm.c's fineweb.py and the
modded-nanogpt downloads), or `<name>_val.bin` and `<name>_train.bin` (llm.c's tinyshakespeare, tinystories):
a header of 256 int32 (magic 20240520, version 1, token count) and uint16 GPT-2 ids, each document preceded by
<|endoftext|>. They were cut at a fixed size from one token stream, val shard first, so a document continues
across shard boundaries, and the first train shard begins with the rest of the val shard's last document
(unless the val shard ended exactly at a document's end).

Every split starts at a document start. In a split's first shard, and in a shard after a gap in the numbering
(a shard that does not continue the one before it), the tokens before the first <|endoftext|> belong to a
document whose start lies elsewhere: they are left out (the entry's `start`). For the first train shard they
are the rest of a validation document, and a piece with no <|endoftext|> in front would run into whatever
precedes it in a shuffled stream. Within a split, a document crossing a shard boundary is read whole.
"""

import glob
import hashlib
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptlab.data.config import DataConfig
from gptlab.data.sample_corpus import BUILT_IN
from gptlab.data.shards import GPT2_VOCAB, MANIFEST, read_header, read_manifest, read_shard, write_manifest
from gptlab.data.tokenizer import EOT, RANKS_SHA256
from gptlab.errors import ConfigError, DataError
from gptlab.files import atomic_write_bytes
from gptlab.locks import LOCK_FILE

FORMAT = "llm.c token shards, indexed in place (gptlab)"
# <name>_<split>_<index>.bin (llm.c, modded-nanogpt), <name>_<split>.bin (llm.c's small datasets), or gptlab's own
SHARD_NAME = re.compile(r"(?:(?P<name>.+?)_)?(?P<split>train|val)(?:_(?P<index>\d+))?\.bin")
CHUNK_TOKENS = 1 << 24  # tokens scanned at a time (32 MB)
# what indexing writes into data.dir, before manifest.json
INDEX_FILE = re.compile(rf".+\.idx|{re.escape(LOCK_FILE)}|\..+\.tmp\d+")


@dataclass(frozen=True)
class ShardFile:
    path: Path
    split: str
    number: int | None  # the shard's number in its name (None: `<name>_train.bin`)


def shard_files(source: str) -> list[Path]:
    """The `.bin` files data.source names: a file, the files directly in a folder, or a glob. Empty for
    anything else (document files, a Hub id)."""
    path = Path(source).expanduser()
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = list(path.iterdir())
    elif glob.has_magic(source):
        candidates = [Path(p) for p in glob.glob(str(path))]
    else:
        return []
    return sorted(p for p in candidates if p.name.endswith(".bin") and not p.name.startswith(".") and p.is_file())


def is_token_shards(cfg: DataConfig) -> bool:
    return cfg.name not in BUILT_IN and bool(shard_files(cfg.source))


def layout(source: str) -> list[ShardFile]:
    """The shards data.source names, each with its split: val first, then train, each in its numbering order."""
    files = shard_files(source)
    parsed = [(p, SHARD_NAME.fullmatch(p.name)) for p in files]
    unnamed = [p.name for p, match in parsed if match is None]
    if unnamed:
        raise DataError(
            f"{source}: cannot tell the split of {', '.join(unnamed[:3])}{' ...' if len(unnamed) > 3 else ''}: "
            "token shards are named <name>_val_<index>.bin and <name>_train_<index>.bin, as llm.c writes them "
            "(data.source may be a glob that leaves other .bin files out)"
        )
    names = sorted({match["name"] or "" for _, match in parsed})
    if len(names) > 1:
        raise DataError(
            f"{source}: holds the shards of {len(names)} datasets ({', '.join(n or '<none>' for n in names)}); "
            f"index one at a time with a glob, e.g. data.source='{Path(source).expanduser() / names[-1]}_*.bin'"
        )
    shards = [ShardFile(p, m["split"], None if m["index"] is None else int(m["index"])) for p, m in parsed]
    order = {"val": 0, "train": 1}
    shards.sort(key=lambda s: (order[s.split], -1 if s.number is None else s.number, s.path.name))
    for split in order:
        numbers = [s.number for s in shards if s.split == split]
        if len(numbers) != len(set(numbers)):
            raise DataError(f"{source}: two {split} shards with the same number (or one with and one without)")
        if not numbers:
            raise DataError(
                f"{source}: no {split} shard (<name>_{split}_<index>.bin); training needs both a train and a val shard"
            )
    return shards


def scan(path: Path) -> tuple[int, np.ndarray, str, int]:
    """One pass over a shard: its token count, the offsets of its <|endoftext|> tokens, sha256, largest id."""
    tokens = read_shard(path)  # checks the header and the size
    digest = hashlib.sha256(read_header(path).tobytes())
    found, largest = [], 0
    for at in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[at : at + CHUNK_TOKENS])
        digest.update(chunk.data)
        found.append(np.flatnonzero(chunk == EOT) + at)
        largest = max(largest, int(chunk.max()))
    starts = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return len(tokens), starts.astype(np.int64), digest.hexdigest(), largest


def index_folder(cfg: DataConfig) -> tuple[Path, bool]:
    """Where the index goes, and whether that is beside the shards (data.dir is their folder)."""
    folder = Path(cfg.dir).expanduser()
    parents = {s.path.parent.resolve() for s in layout(cfg.source)}
    return folder, folder.exists() and parents == {folder.resolve()}


def check_folder(cfg: DataConfig) -> None:
    """Refuse a data.dir that holds other files, unless it is the shards' own folder."""
    from gptlab.data.prepare import foreign_files, shown  # prepare imports this module

    folder, beside = index_folder(cfg)
    foreign = [] if beside else foreign_files(folder, INDEX_FILE)
    if foreign:
        raise ConfigError(
            "data.dir",
            f"{folder} holds other files ({shown(foreign)}): the index of token shards goes into an empty or "
            "new folder, or beside the shards (data.dir=<their folder>); set data.dir to one",
        )


def header(cfg: DataConfig) -> dict:
    """What indexing cfg.source records in the manifest before its shard list."""
    return {
        "format": FORMAT,
        "source": {"name": cfg.name, "source": cfg.source, "folder": str(layout(cfg.source)[0].path.parent.resolve())},
        # llm.c's magic 20240520 means GPT-2 ids (its Llama 3 shards have another); every id is checked < 50257
        "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "eot": EOT},
        "val_fraction": None,  # the val split is the val shards
    }


def index_dataset(cfg: DataConfig) -> dict:
    """Index the token shards of cfg.source into cfg.dir (see the module doc) and return the manifest."""
    from gptlab.data.prepare import worker_pool  # prepare imports this module

    shards = layout(cfg.source)
    folder, beside = index_folder(cfg)
    if (folder / MANIFEST).is_file():
        return read_manifest(folder)
    check_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    entries, skipped = [], {"train": 0, "val": 0}
    previous: dict[str, ShardFile] = {}
    in_piece = set()  # splits whose next shard still continues a document that began before the split
    paths = [s.path for s in shards]
    with worker_pool(cfg.prepare.workers) as pool, tqdm(total=len(shards), desc="Indexing", unit=" shards") as bar:
        results = pool.imap(scan, paths) if pool is not None else map(scan, paths)
        for shard, (n_tokens, eots, sha, largest) in zip(shards, results):
            bar.update()
            if largest >= GPT2_VOCAB:
                raise DataError(f"{shard.path}: holds token id {largest}, not a GPT-2 id (gptlab reads GPT-2 shards)")
            before = previous.get(shard.split)
            numbered = before is not None and None not in (before.number, shard.number)
            if not (numbered and shard.number == before.number + 1):  # the first of its split, or after a gap
                in_piece.add(shard.split)
            start = 0
            if shard.split in in_piece:
                start = int(eots[0]) if len(eots) else n_tokens
                if len(eots):
                    in_piece.discard(shard.split)
            skipped[shard.split] += start
            previous[shard.split] = shard
            index_name = shard.path.with_suffix(".idx").name
            atomic_write_bytes(folder / index_name, eots.tobytes())
            entry = {
                "file": shard.path.name if beside else str(shard.path.resolve()),
                "index": index_name,
                "split": shard.split,
                "tokens": n_tokens,
                "documents": len(eots),
                "sha256": sha,
            }
            entries.append(entry | ({"start": start} if start else {}))
    for split in ("val", "train"):
        if not any(e["split"] == split and e["tokens"] > e.get("start", 0) for e in entries):
            raise DataError(f"{cfg.source}: the {split} shards hold no whole document (no <|endoftext|>)")
    manifest = header(cfg) | {
        "documents": {split: sum(e["documents"] for e in entries if e["split"] == split) for split in ("train", "val")},
        "left_out_tokens": skipped,  # before each split's first document (see the module doc)
        "shards": entries,
        "python": platform.python_version(),
    }
    write_manifest(folder, manifest)  # written last: its presence marks a finished index
    return manifest


def plan(cfg: DataConfig) -> str:
    """What indexing will read and write; the shards are listed now, so a bad folder fails before any work."""
    shards = layout(cfg.source)
    folder, beside = index_folder(cfg)
    lines = [f"Indexing the token shards of {cfg.source} (llm.c / modded-nanogpt format) without re-tokenizing"]
    for split in ("val", "train"):
        names = [s.path.name for s in shards if s.split == split]
        listed = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]} ({len(names)} shards)"
        lines.append(f"  {split + ':':<7}{listed}")
    where = "beside the shards" if beside else "(the shards are only read)"
    lines.append(f"  writes: {folder / MANIFEST} and one .idx per shard {where}")
    return "\n".join(lines)


def summary(folder: Path, manifest: dict, seconds: float) -> str:
    shards = manifest["shards"]
    total = sum(e["tokens"] - e.get("start", 0) for e in shards)
    lines = [f"Indexed {folder} in {seconds:.1f} s: {len(shards)} shards, {total:,} tokens"]
    for split in ("train", "val"):
        tokens = sum(e["tokens"] - e.get("start", 0) for e in shards if e["split"] == split)
        line = f"  {split:<5} {tokens:>15,} tokens {manifest['documents'][split]:>12,} documents"
        left_out = manifest["left_out_tokens"][split]
        if left_out:
            line += f" (the first {left_out:,} tokens left out: the rest of a document begun before the split)"
        lines.append(line)
    return "\n".join(lines)

