"""Reading a checkpoint file, with one line naming the file and what is wrong with it when it does not read.

torch.load's own errors do not say which: an empty file is an EOFError, a truncated one an "internal miniz error",
and random bytes an unpickling error about weights_only; with mmap=True any non-zip file is "mmap can only be used
with files saved with torch.save(_use_new_zipfile_serialization=True)". So the file is looked at first."""

import os
import re
import zipfile
from pathlib import Path

import torch

from gptlab.errors import DataError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6 is a zip archive, its records in <name>/
PICKLE_MAGIC = b"\x80"  # the older format (_use_new_zipfile_serialization=False) is a pickle stream


def read_checkpoint(path: str | os.PathLike, **torch_load_kwargs) -> dict:
    """torch.load(path, weights_only=True, **torch_load_kwargs) (e.g. map_location, mmap=True) of a checkpoint,
    a dict. Any failure to read it is a DataError naming the file: missing or unreadable, empty, truncated or
    damaged, not a PyTorch checkpoint, holding objects other than tensors and plain values, or not a dict."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
        whole_zip = zipfile.is_zipfile(path)
        names = _zip_names(path) if whole_zip else []
    except OSError as e:
        raise DataError(f"cannot read the checkpoint {path}: {e.strerror or e}") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{path} is truncated or damaged (its zip directory: {e})") from None
    if not head:
        raise DataError(f"{path} is empty (0 bytes): not a checkpoint")
    if head == ZIP_MAGIC and not whole_zip:  # a zip's directory is at its end: cut short, or overwritten
        raise DataError(f"{path} is truncated or damaged (not a whole torch.save archive)")
    if whole_zip and not any(name.endswith("/data.pkl") for name in names):
        raise DataError(f"{path} is a zip archive, but not a PyTorch checkpoint (no data.pkl in it)")
    if not whole_zip and not head.startswith(PICKLE_MAGIC):
        raise DataError(f"{path} is not a PyTorch checkpoint (not a file torch.save writes)")
    if not whole_zip:
        torch_load_kwargs.pop("mmap", None)  # the older format cannot be memory-mapped: read it whole
    try:
        checkpoint = torch.load(path, weights_only=True, **torch_load_kwargs)
    except OSError as e:
        raise DataError(f"cannot read the checkpoint {path}: {e.strerror or e}") from None
    except Exception as e:  # torch's errors for a damaged archive or a forbidden object
        raise DataError(f"{path} is {_what(e)}") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict)")
    return checkpoint


def _zip_names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:  # reads the directory at the end alone
        return archive.namelist()


def _what(e: Exception) -> str:
    """What torch.load's error says is wrong with the file, in a few words."""
    text = str(e)
    if forbidden := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"not loadable with weights_only=True: it holds a {forbidden[1]}, not only tensors and plain values"
    message = text.strip().splitlines()[0].split(" This is an internal")[0] if text.strip() else ""
    if "Weights only load failed" in text:
        return f"not loadable with weights_only=True ({message})"
    return f"truncated or damaged ({type(e).__name__}: {message[:200]})"
