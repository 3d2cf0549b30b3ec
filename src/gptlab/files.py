"""Writing files so that a kill never leaves half of one, and checksumming them. Shards, manifests, checkpoints,
summaries and downloads all go through here."""

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from gptlab.errors import DiskError

FULL = (errno.ENOSPC, errno.EDQUOT)  # of DiskError.errnos: the two that say how much space is left


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file beside it, fsynced and renamed over `path` when the
    block ends without an error (and removed when it does not). Readers see the old file or the new one, never
    part of one; the rename is fsynced too, so it survives a power loss. Leftovers of a killed writer
    (`.<name>.tmp<pid>`) are removed first. A write the file system refuses (disk full, read-only) is a DiskError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    existed = os.path.exists(path)  # False, not an error, where the folder cannot be read
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp*"):
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # e.g. a read-only file system refuses even this: keep e's report
            tmp.unlink(missing_ok=True)
        refused = refused_write(e)
        if refused is None:
            raise
        raise disk_error(refused, path, existed) from e
    _fsync_dir(path.parent)


def refused_write(e: BaseException) -> OSError | None:
    """The OSError behind `e` when the file system refused a write. torch.save into a file object reports a full
    disk as RuntimeError("[enforce fail at inline_container.cc:...] unexpected pos ..."), raised while handling
    the OSError(ENOSPC) of the write itself: so the chain of causes is searched, not `e` alone."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DiskError.errnos:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def disk_error(e: OSError, path: Path, existed: bool) -> DiskError:
    """One line that begins with the OS's words: what was refused, where, and what is left as it was."""
    free = ""
    if e.errno in FULL:
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free on that filesystem)"
    kept = "the previous file is unchanged" if existed else "nothing was written"
    return DiskError(f"{e.strerror or os.strerror(e.errno)} while writing {path}{free}; {kept}")


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` a second name of `source`'s file (a hard link), atomically: readers see the old target or the
    new one. Where the file system has no hard links, a copy, written atomically."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        with atomic_open(target) as f, open(source, "rb") as src:
            shutil.copyfileobj(src, f)
        return
    os.replace(tmp, target)
    _fsync_dir(target.parent)


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
