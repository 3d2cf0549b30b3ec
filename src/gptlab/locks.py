"""One writer per folder: a run folder while it trains, a data folder while it is prepared.

The lock is an flock on <folder>/.gptlab.lock, which also records who holds it (host, pid, command, time) so that
a second writer fails at once with a message naming the holder. The kernel drops an flock when its process dies,
however it dies, so the lock of a killed run is taken over by the next one with no stale-lock guessing (on NFS the
Linux client turns flock into a lock the server tracks). The file is removed when the lock is released, so a
folder is left as it was; acquire checks that the file it locked is still the one at the path.
"""

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from gptlab.errors import DiskError, UserInputError

LOCK_FILE = ".gptlab.lock"


class FolderInUse(UserInputError):
    label = "Folder in use"


class FolderLock:
    """`with FolderLock(folder, "training"):` the folder is this process's for the block; FolderInUse at once if
    another process holds it. Creates the folder."""

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder, self.purpose = Path(folder), purpose
        self.path = self.folder / LOCK_FILE
        self._file = None

    def acquire(self) -> "FolderLock":
        while True:
            f = self._open()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read()
                f.close()
                raise FolderInUse(_busy_message(self.folder, holder)) from None
            if _same_file(f, self.path):
                break
            f.close()  # its holder removed the file as it released it: lock the one now at the path
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_this_process(self.purpose)) + "\n")
        f.flush()
        self._file = f
        return self

    def _open(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a+")
        except OSError as e:  # a read-only or full file system, a folder of another user's
            raise DiskError(f"{e.strerror}: cannot write into {self.folder}, needed for {self.purpose}") from None

    def release(self) -> None:
        """Remove the lock file, then drop the lock: a process that opened the file meanwhile finds it gone
        (acquire's _same_file) and tries again."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()  # closing drops the flock
            self._file = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(f, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _this_process(purpose: str) -> dict:
    return {
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def _busy_message(folder: Path, holder_text: str) -> str:
    try:
        h = json.loads(holder_text)
    except json.JSONDecodeError:  # the holder is writing its record this instant
        return f"{folder} is being claimed by another process right now"
    return (
        f"{folder} is in use: {h['purpose']} by pid {h['pid']} on {h['host']} since {h['since']} "
        f"({h['command']}); wait for it to end or stop it"
    )
