"""The built-in corpora: real text that every Python install already has, prepared with no download.

- `sample` (data=sample): English prose. Documents are the pydoc help topics (the language reference behind
  `help("FOR")`) and, for each standard-library module, its docstrings read from source with `ast` (nothing is
  imported). On CPython 3.11 that is 424 documents and about 550k GPT-2 tokens.
- `sample_code` (data=sample_code): Python code. One document per standard-library source file, its text as
  is (code, comments and docstrings). Left out are files that are not UTF-8, shorter than MIN_DOCUMENT_CHARS or
  longer than MAX_CODE_FILE_CHARS (the largest modules: with them the corpus would be 3.9M tokens, two thirds
  of it from those 90 files), the folders `encodings` (mostly generated codec tables) and `pydoc_data` (the help topics,
  already in `sample`), and the files the Python build writes (python-config.py, _sysconfigdata_*.py: they
  hold the install's paths). The choice depends only on the Python version. On CPython 3.11 that is 345
  documents, 3.2M characters and about 1.42M GPT-2 tokens (2.26 characters per token).

Together they give a two-corpus data mixture (prose and code) for CPU-sized ablations. Both read the same
standard-library files (stdlib_files) in sorted order; document ids are `pydoc:<topic>` and `module:<path>`,
paths relative to the standard library, in both corpora: a module's docstrings (sample) and its source
(sample_code) share an id, so the hash that holds out validation documents puts them on the same side, and
neither corpus validates on text the other trains on. BUILT_IN maps each corpus's data.name to its stream.
"""

import ast
import os
import platform
import re
import sysconfig
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics

from gptlab.data.sources import Document, Stream

SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3"}
CODE_SKIPPED_DIRS = SKIPPED_DIRS | {"encodings", "pydoc_data"}
BUILD_FILES = re.compile(r"config-.*|_sysconfigdata.*")  # a folder or file (name) that the Python build wrote
MIN_DOCSTRING_CHARS = 80  # one-line docstrings ("Return self.") add noise, not text
MIN_DOCUMENT_CHARS = 200
MAX_CODE_FILE_CHARS = 30_000  # sample_code: about 1.4M tokens, 3/4 of the files (CPython 3.11)


def sample_stream() -> Stream:
    """The prose corpus as a source stream (train and val, split by document id), for gptlab.data.prepare."""
    origin = f"pydoc topics and standard-library docstrings of Python {platform.python_version()}"
    return stream(sample_documents(), origin)


def code_stream() -> Stream:
    """The code corpus as a source stream (train and val, split by document id), for gptlab.data.prepare."""
    origin = (
        f"standard-library source files of Python {platform.python_version()} "
        f"(up to {MAX_CODE_FILE_CHARS:,} characters each)"
    )
    return stream(code_documents(), origin)


BUILT_IN: dict[str, Callable[[], Stream]] = {"sample": sample_stream, "sample_code": code_stream}  # by data.name


def stream(docs: list[tuple[str, str]], origin: str) -> Stream:
    return Stream(("train", "val"), lambda start: (Document(i, text, {}) for i, text in docs[start:]), origin)


def sample_documents() -> list[tuple[str, str]]:
    """(id, text) pairs of the prose corpus in a fixed order."""
    docs = [(f"pydoc:{name}", text) for name, text in sorted(topics.items())]
    for name, path in stdlib_files(SKIPPED_DIRS):
        text = module_docstrings(path)
        if len(text) >= MIN_DOCUMENT_CHARS:
            docs.append((f"module:{name}", text))
    return docs


def code_documents() -> list[tuple[str, str]]:
    """(id, text) pairs of the code corpus in a fixed order."""
    docs = []
    for name, path in stdlib_files(CODE_SKIPPED_DIRS):
        if any(BUILD_FILES.fullmatch(part) for part in name.split("/")):
            continue
        text = read_utf8(path)
        if MIN_DOCUMENT_CHARS <= len(text) <= MAX_CODE_FILE_CHARS:
            docs.append((f"module:{name}", text))  # as in sample: the same split
    return docs


def stdlib_files(skipped_dirs: set[str]) -> list[tuple[str, Path]]:
    """(path relative to the standard library, as posix; path) of its .py files outside skipped_dirs, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in skipped_dirs]  # not walked at all: site-packages can be huge
        paths += [Path(folder, name) for name in names if name.endswith(".py")]
    if not paths:
        raise RuntimeError(f"no standard-library sources under {stdlib}: cannot build the built-in corpora")
    return [(path.relative_to(stdlib).as_posix(), path) for path in sorted(paths)]


def read_utf8(path: Path) -> str:
    """The file's text; empty if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def module_docstrings(path: Path) -> str:
    """The module docstring followed by its classes' and functions' longer docstrings."""
    try:
        tree = ast.parse(read_utf8(path))
    except (SyntaxError, ValueError):
        return ""
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            if len(doc) >= MIN_DOCSTRING_CHARS:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)
