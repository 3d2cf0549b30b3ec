"""Turn documents into a folder of token shards plus manifest.json (format: gptlab.data.shards)."""

import hashlib
import platform
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from gptlab.data.shards import shard_name, write_manifest, write_shard
from gptlab.data.tokenizer import EOT, RANKS_SHA256, gpt2_tokenizer

SHARD_TOKENS = 100_000_000  # tokens per shard (200 MB), as in build-nanogpt


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """A stable, order-independent split: a document's id alone decides where it goes."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return bucket < val_fraction


def tokenize(texts: list[str]) -> list[np.ndarray]:
    """GPT-2 ids of each text, preceded by <|endoftext|>."""
    encoded = gpt2_tokenizer().encode_ordinary_batch(texts)
    return [np.array([EOT, *ids], dtype=np.uint16) for ids in encoded]


def write_split(folder: Path, split: str, docs: Iterable[np.ndarray], shard_tokens: int) -> list[dict]:
    """Pack tokenized documents into shards of at most `shard_tokens` (documents may span shards)."""
    entries, buffer, starts, filled = [], np.empty(shard_tokens, dtype=np.uint16), [], 0

    def flush() -> None:
        nonlocal filled, starts
        name = shard_name(split, len(entries))
        sha = write_shard(folder / name, buffer[:filled], np.array(starts, dtype=np.int64))
        entries.append({"file": name, "split": split, "tokens": filled, "documents": len(starts), "sha256": sha})
        filled, starts = 0, []

    for doc in docs:
        starts.append(filled)
        while len(doc):
            take = min(len(doc), shard_tokens - filled)
            buffer[filled : filled + take] = doc[:take]
            filled, doc = filled + take, doc[take:]
            if filled == shard_tokens:
                flush()
    if filled:
        flush()
    return entries


def write_dataset(
    folder: Path, docs: list[tuple[str, str]], source: dict, val_fraction: float, shard_tokens: int = SHARD_TOKENS
) -> dict:
    """Tokenize (id, text) documents, split them by id into train/val and write shards + manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    val = [text for doc_id, text in docs if is_validation(doc_id, val_fraction)]
    train = [text for doc_id, text in docs if not is_validation(doc_id, val_fraction)]
    shards = write_split(folder, "train", tokenize(train), shard_tokens)
    shards += write_split(folder, "val", tokenize(val), shard_tokens)
    manifest = {
        "format": "llm.c token shards (gptlab)",
        "source": source,
        "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "eot": EOT},
        "val_fraction": val_fraction,
        "python": platform.python_version(),
        "shards": shards,
    }
    write_manifest(folder, manifest)  # written last: its presence marks a finished dataset
    return manifest
