"""Writing files so that a kill never leaves half of one, and checksumming them. Shards, manifests, checkpoints,
summaries and downloads all go through here."""

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file beside it, fsynced and renamed over `path` when the
    block ends without an error (and removed when it does not). Readers see the old file or the new one, never
    part of one; the rename is fsynced too, so it survives a power loss. Leftovers of a killed writer
    (`.<name>.tmp<pid>`) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, *chunks: bytes | memoryview) -> None:
    """Write chunks to `path` atomically (see atomic_open)."""
    with atomic_open(path) as f:
        for chunk in chunks:
            f.write(chunk)


def sha256_of(path: Path, chunk_bytes: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file or a folder (a sharded checkpoint); nothing if there is none."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
