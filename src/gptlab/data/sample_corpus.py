"""The built-in sample corpus: real English text that every Python install already has.

Documents are the pydoc help topics (the language reference behind `help("FOR")`) and, for each
standard-library module, its docstrings read from source with `ast` (nothing is imported). On
CPython 3.11 that is 424 documents and about 550k GPT-2 tokens.
"""

import ast
import platform
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

from gptlab.data.sources import Document, Stream

SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3"}
MIN_DOCSTRING_CHARS = 80  # one-line docstrings ("Return self.") add noise, not text
MIN_DOCUMENT_CHARS = 200


def sample_stream() -> Stream:
    """The corpus as a source stream (train and val, split by document id), for gptlab.data.prepare."""
    docs = sample_documents()
    origin = f"pydoc topics and standard-library docstrings of Python {platform.python_version()}"
    return Stream(("train", "val"), lambda start: (Document(i, text, {}) for i, text in docs[start:]), origin)


def sample_documents() -> list[tuple[str, str]]:
    """(id, text) pairs in a fixed order."""
    docs = [(f"pydoc:{name}", text) for name, text in sorted(topics.items())]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_DIRS.intersection(relative.parts):
            continue
        text = module_docstrings(path)
        if len(text) >= MIN_DOCUMENT_CHARS:
            docs.append((f"module:{relative.as_posix()}", text))
    if len(docs) <= len(topics):
        raise RuntimeError(f"no standard-library sources under {stdlib}: cannot build the sample corpus")
    return docs


def module_docstrings(path: Path) -> str:
    """The module docstring followed by its classes' and functions' longer docstrings."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            if len(doc) >= MIN_DOCSTRING_CHARS:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)
