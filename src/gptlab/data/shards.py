"""The on-disk token shard format, shared with llm.c and modded-nanogpt.

A shard `<split>_<index:06d>.bin` is a header of 256 int32 (magic 20240520, version 1, token count,
then zeros) followed by the tokens as uint16. Beside it, `<split>_<index:06d>.idx` holds the offset
of each document's first token (its <|endoftext|>) as int64. `manifest.json` describes the folder.
Every file is written to a temporary name and renamed, so a crash never leaves a half-written file.

A manifest entry may also name a shard outside the folder and its index inside it (gptlab.data.index: llm.c
and modded-nanogpt shards indexed in place): `file` is then an absolute path, `index` the .idx file's name,
and `start` the tokens at the shard's start that are not part of its split (the tail of a document that
began in the shard before; every split starts at a document start).
"""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.errors import DataError
from gptlab.files import atomic_write_bytes, sha256_of

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"
GPT2_VOCAB = 50257  # the ids a shard may hold; every model's vocab_size covers them (gptlab.model_config)
CHUNK_TOKENS = 1 << 24  # tokens scanned at a time (32 MB)


class ShardError(DataError):
    pass


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: Path, tokens: np.ndarray, doc_starts: np.ndarray) -> str:
    """Write tokens (any int array < 2**16) and their document index; return the shard's sha256."""
    if tokens.size and int(tokens.max()) >= 2**16:
        raise ShardError(f"{path.name}: token id {int(tokens.max())} does not fit uint16")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, len(tokens))
    body = np.ascontiguousarray(tokens, dtype=np.uint16)  # no copy when the tokens are uint16 already
    atomic_write_bytes(path, header.tobytes(), body.data)
    atomic_write_bytes(path.with_suffix(".idx"), np.asarray(doc_starts, dtype=np.int64).tobytes())
    digest = hashlib.sha256(header.tobytes())
    digest.update(body.data)
    return digest.hexdigest()


OTHER_MAGIC = {  # what llm.c's other .bin files are, for the message that refuses them
    20240522: "llm.c's evaluation-data format (HellaSwag, MMLU), not a token shard",
    20240801: "llm.c's Llama 3 format (uint32 tokens); gptlab reads GPT-2 token shards",
}


def read_header(path: Path) -> np.ndarray:
    """A shard's header, checked: its magic number and version."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        known = OTHER_MAGIC.get(int(header[0])) if len(header) else None
        why = f"magic {header[0]}: {known}" if known else "bad magic number"
        raise ShardError(f"{path}: not a token shard ({why})")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]}")
    return header


def read_shard(path: Path) -> np.ndarray:
    """Memory-map a shard's tokens (uint16) after checking its header."""
    header = read_header(path)
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if path.stat().st_size != expected:
        raise ShardError(f"{path}: size {path.stat().st_size} bytes, header promises {expected}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def read_doc_starts(path: Path) -> np.ndarray:
    return np.fromfile(path.with_suffix(".idx"), dtype=np.int64)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{folder}: no {MANIFEST}; prepare the dataset first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None


def check_dataset(folder: Path, tokenizer_sha256: str, verify_checksums: bool) -> dict:
    """Refuse a prepared folder that training would misread: wrong tokenizer, missing, truncated or
    altered shards (with verify_checksums=False: shards holding ids outside the vocabulary), or a split
    with no tokens. Returns the manifest."""
    manifest = read_manifest(folder)
    prepared_with = manifest.get("tokenizer", {}).get("ranks_sha256")
    if prepared_with != tokenizer_sha256:
        raise ShardError(
            f"{folder} was tokenized with ranks sha256 {prepared_with}, but this gptlab's GPT-2 tokenizer "
            f"is {tokenizer_sha256}: prepare the dataset again"
        )
    for split in ("train", "val"):
        if not any(e["split"] == split and e["tokens"] > e.get("start", 0) for e in manifest["shards"]):
            raise ShardError(f"{folder}: the manifest lists no {split} tokens")
    for entry in manifest["shards"]:
        path = Path(folder) / entry["file"]  # an absolute `file` (a shard indexed in place) stays as it is
        if not path.is_file():
            raise ShardError(f"{path}: listed in {MANIFEST} but missing")
        tokens = read_shard(path)
        if len(tokens) != entry["tokens"]:
            raise ShardError(f"{path}: holds {len(tokens)} tokens, {MANIFEST} says {entry['tokens']}")
        if verify_checksums:  # the shard as prepared: its ids were checked then
            if sha256_of(path) != entry["sha256"]:
                raise ShardError(f"{path}: sha256 differs from {MANIFEST}: the shard was altered or damaged")
        else:  # an id past the model's vocabulary would stop training mid-run, with an IndexError
            check_token_ids(path, tokens)
    return manifest


def check_token_ids(path: Path, tokens: np.ndarray) -> None:
    """Refuse a shard holding an id outside GPT-2's vocabulary (uint16 goes up to 65535). Cheap next to a checksum:
    ~10 ms per 100M tokens in the page cache (a read of the file otherwise)."""
    for at in range(0, len(tokens), CHUNK_TOKENS):
        chunk = np.asarray(tokens[at : at + CHUNK_TOKENS])
        if chunk.max() >= GPT2_VOCAB:
            where = int(np.argmax(chunk >= GPT2_VOCAB))
            raise ShardError(
                f"{path}: token {at + where:,} is id {chunk[where]}, outside the vocabulary of {GPT2_VOCAB} GPT-2 ids: "
                f"the shard is damaged or not GPT-2 tokens (data.verify_checksums=true checks it against {MANIFEST})"
            )


@dataclass(frozen=True)
class Shard:
    """One shard of a split: its tokens file, its document index, and where the split's tokens begin in it."""

    path: Path
    index: Path  # the .idx file: document starts, as offsets in the whole shard
    start: int = 0  # tokens before it belong to a document that began in an earlier shard (see the module doc)

    def tokens(self) -> np.ndarray:
        return read_shard(self.path)[self.start :]

    def doc_starts(self) -> np.ndarray:
        """Document starts as offsets in tokens()."""
        return np.fromfile(self.index, dtype=np.int64) - self.start

    def num_documents(self) -> int:
        return self.index.stat().st_size // 8


def split_shards(folder: Path, manifest: dict, split: str) -> Iterator[Shard]:
    """The shards of `split`, in manifest order."""
    for entry in manifest["shards"]:
        if entry["split"] == split:
            path = Path(folder) / entry["file"]
            index = Path(folder) / entry["index"] if "index" in entry else path.with_suffix(".idx")
            yield Shard(path, index, entry.get("start", 0))
