"""Where documents come from: a Hugging Face Hub dataset (streamed) or local files, in a fixed order.

A data config is read as one or two streams of `Document`s. With data.val_source, a validation stream
and a training stream each feed their own split; otherwise one stream feeds both, and a document's id
decides its split (gptlab.data.prepare.is_validation). With local files, a data.val_source that names no
file, folder or glob (a hub split name, like SlimPajama's `validation`) is the folder of that name beside the
training files or above them (SlimPajama-627B/train -> SlimPajama-627B/validation). `Stream.read(start)` begins
at the start-th document of the stream, which is how an interrupted prepare resumes.

Local files: .parquet and .jsonl / .jsonl.zst (one JSON object per line) in the FineWeb or SlimPajama
schema, or .txt (a whole file is one document). Folders are searched recursively, files read in sorted
order, parquet one batch of rows at a time and .zst streamed, so no file is ever loaded whole.
"""

import functools
import glob
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from gptlab.data.config import DataConfig, FilterConfig
from gptlab.errors import DataError

SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst", ".txt")
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time: a few MB of FineWeb text
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "owner/name" (or a legacy "name") on the Hub
# What becomes of a document, in the order it is decided; the manifest counts each per split.
COUNTS = ("kept", "filtered", "skipped_empty", "skipped_non_utf8")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str  # holds lone surrogates where the source bytes were not UTF-8 (see is_utf8)
    row: dict  # the source record (for filters); parquet rows carry only the columns read


@dataclass(frozen=True)
class Stream:
    splits: tuple[str, ...]  # ("train", "val"): each document's id picks its split
    read: Callable[[int], Iterator[Document]]  # read(start): the documents from the start-th on
    origin: str | list[str]  # the hub split, or the local files relative to their folder


def streams(cfg: DataConfig) -> list[Stream]:
    """The streams of cfg, validation first; local files are listed now, so a bad path fails early."""
    from gptlab.data.sample_corpus import BUILT_IN  # here, not above: sample_corpus builds on this module

    if cfg.name in BUILT_IN:  # a built-in corpus (sample, sample_code): data.source is not read
        return [BUILT_IN[cfg.name]()]
    hub = is_hub_id(cfg.source)

    def stream(where: str, splits: tuple[str, ...]) -> Stream:  # where: a hub split or local files
        if hub:
            return Stream(splits, functools.partial(read_hub, cfg, where), where)
        base, files = local_files(where)
        return Stream(splits, functools.partial(read_local, cfg, base, files), [relative(p, base) for p in files])

    train = cfg.train_split if hub else cfg.source
    if cfg.val_source is None:
        return [stream(train, ("train", "val"))]
    val = cfg.val_source if hub else local_val_source(cfg)
    if val == train if hub else shared_files(val, train):
        raise DataError(f"data.val_source={cfg.val_source} overlaps the training data ({train}): it must be held out")
    return [stream(val, ("val",)), stream(train, ("train",))]


def is_hub_id(source: str) -> bool:
    """A source that names no local file, folder or glob but looks like owner/name is a Hub dataset."""
    return not Path(source).expanduser().exists() and bool(HUB_ID.fullmatch(source)) and not supported(source)


# ---- the Hugging Face Hub


def read_hub(cfg: DataConfig, split: str, start: int) -> Iterator[Document]:
    """Stream one split from the Hub (nothing is downloaded ahead); a document's default id is "<split>:<row>"."""
    import datasets  # takes a second to import: only when a hub dataset is read

    try:
        rows = datasets.load_dataset(cfg.source, name=cfg.hub_config, split=split, streaming=True)
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError, ValueError) as e:
        raise DataError(
            f"{cfg.source} (config {cfg.hub_config}, split {split}): cannot stream it from the Hugging Face Hub "
            f"({e}); for local files, data.source must name an existing file, folder or glob"
        ) from None
    for row_index, row in enumerate(rows.skip(start) if start else rows, start):
        yield document(cfg, row, f"{split}:{row_index}", f"{cfg.source} {split} row {row_index}")


# ---- local files


def local_files(source: str) -> tuple[Path, list[Path]]:
    """The supported files `source` names (a file, a folder searched recursively, or a glob), sorted by
    their path relative to the returned folder, which documents' default ids are relative to."""
    path = Path(source).expanduser()
    if path.is_file():
        if not supported(path.name):
            raise DataError(f"{source}: unsupported file type; expected {', '.join(SUFFIXES)}")
        return path.parent, [path]
    if path.is_dir():
        base, candidates = path, path.rglob("*")
    else:
        parts = path.parts
        magic = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
        base, candidates = Path(*parts[:magic]), map(Path, glob.glob(str(path), recursive=True))
    files = [p for p in candidates if p.is_file() and supported(p.name) and not hidden(p, base)]
    if not files:
        raise DataError(f"{source}: matches no {', '.join(SUFFIXES)} file")
    return base, sorted(files, key=lambda p: relative(p, base))


def local_val_source(cfg: DataConfig) -> str:
    """The local validation files of cfg: data.val_source if it names a file, folder or glob; otherwise (a hub
    split name, like SlimPajama's `validation`) the folder of that name nearest above the training files
    (SlimPajama-627B/train -> SlimPajama-627B/validation)."""
    val = Path(cfg.val_source).expanduser()
    if val.exists() or glob.has_magic(cfg.val_source):
        return cfg.val_source
    base = local_files(cfg.source)[0]  # the training files' folder (a bad data.source fails here, naming itself)
    if not val.is_absolute():
        for folder in base.absolute().parents:
            if (folder / val).is_dir():
                return str(folder / val)
    raise DataError(
        f"data.val_source={cfg.val_source}: no such file, folder or glob, nor a folder {cfg.val_source} beside "
        f"{base} or above it; set data.val_source=<path of the validation files>, or data.val_source=null to "
        f"hold out data.val_fraction={cfg.val_fraction:g} of the documents by a hash of their id"
    )


def shared_files(source: str, other: str) -> set[Path]:
    return {p.resolve() for p in local_files(source)[1]} & {p.resolve() for p in local_files(other)[1]}


def read_local(cfg: DataConfig, base: Path, files: list[Path], start: int) -> Iterator[Document]:
    """Documents of the files from the start-th on; a document's default id is "<relative path>:<row>"."""
    for path in files:
        if start:  # skip whole files without decoding them
            rows = count_rows(path)
            if start >= rows:
                start -= rows
                continue
        name = relative(path, base)
        for row, where, record in read_records(cfg, path, skip=start):
            yield document(cfg, record, f"{name}:{row}", where)
        start = 0


def read_records(cfg: DataConfig, path: Path, skip: int) -> Iterator[tuple[int, str, dict]]:
    """(row, where, record) of a file from row `skip` on; `where` locates the record in messages."""
    if path.name.endswith(".parquet"):
        yield from parquet_records(cfg, path, skip)
    elif path.name.endswith(".txt"):
        if skip == 0:
            yield 0, str(path), {cfg.text_field: path.read_bytes().decode("utf-8", "surrogateescape")}
    else:
        yield from json_records(path, skip)


def count_rows(path: Path) -> int:
    if path.name.endswith(".parquet"):
        return open_parquet(path).metadata.num_rows
    if path.name.endswith(".txt"):
        return 1
    return sum(1 for line in json_lines(path) if line.strip())


def parquet_records(cfg: DataConfig, path: Path, skip: int) -> Iterator[tuple[int, str, dict]]:
    parquet = open_parquet(path)
    names = parquet.schema_arrow.names
    for key, column in (("text_field", cfg.text_field), ("id_field", cfg.id_field)):
        if column is not None and column not in names:
            raise DataError(f"{path}: no column {column!r} (data.{key}); its columns: {', '.join(names)}")
    # Read only what is used; a filter's missing column fails the filter, as a missing key does.
    wanted = [cfg.text_field, cfg.id_field, *(f.field.split(".")[0] for f in cfg.prepare.filters)]
    columns = [c for c in dict.fromkeys(wanted) if c in names]
    first_group, row = 0, 0  # skip whole row groups by their metadata
    while first_group < parquet.num_row_groups and row + parquet.metadata.row_group(first_group).num_rows <= skip:
        row += parquet.metadata.row_group(first_group).num_rows
        first_group += 1
    groups = range(first_group, parquet.num_row_groups)
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
            for record in batch.to_pylist():
                if row >= skip:
                    yield row, f"{path} row {row}", record
                row += 1
    except pa.ArrowException as e:
        raise DataError(f"{path}: damaged parquet file ({e})") from None


def open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a valid parquet file ({e})") from None


def json_records(path: Path, skip: int) -> Iterator[tuple[int, str, dict]]:
    row = 0
    for line_number, line in enumerate(json_lines(path), 1):
        if not line.strip():  # blank lines are tolerated and are not documents
            continue
        if row >= skip:
            where = f"{path}:{line_number}"
            try:  # undecodable bytes become lone surrogates: the document is skipped, not the file refused
                record = json.loads(line.decode("utf-8", "surrogateescape"))
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: not a JSON object")
            yield row, where, record
        row += 1


def json_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        if not path.name.endswith(".zst"):
            yield from f
            return
        try:
            yield from io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True))
        except zstandard.ZstdError as e:
            raise DataError(f"{path}: not a valid zstd file ({e})") from None


def supported(name: str) -> bool:
    return name.endswith(SUFFIXES)


def hidden(path: Path, base: Path) -> bool:
    """Under a hidden folder (.git, the .cache of a Hub download) or hidden itself: not a document file."""
    return any(part.startswith(".") for part in path.relative_to(base).parts)


def relative(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


# ---- documents, filters and what becomes of them


def document(cfg: DataConfig, record: dict, default_id: str, where: str) -> Document:
    """The Document of a source record: text from cfg.text_field, id from cfg.id_field or `default_id`."""
    if cfg.text_field not in record:
        raise DataError(f"{where}: no field {cfg.text_field!r} (data.text_field); it has: {', '.join(record)}")
    text = record[cfg.text_field]
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    elif text is None:
        text = ""
    elif not isinstance(text, str):
        raise DataError(f"{where}: field {cfg.text_field!r} (data.text_field) holds {type(text).__name__}, not text")
    if cfg.id_field is None:
        return Document(default_id, text, record)
    if record.get(cfg.id_field) is None:
        raise DataError(
            f"{where}: no field {cfg.id_field!r} (data.id_field); "
            "set data.id_field=null to identify documents by their file and row"
        )
    return Document(str(record[cfg.id_field]), text, record)


def verdict(doc: Document, filters: list[FilterConfig]) -> str:
    """What becomes of a document: one of COUNTS."""
    if not is_utf8(doc.text):
        return "skipped_non_utf8"
    if not doc.text.strip():
        return "skipped_empty"
    if not all(passes(doc.row, f) for f in filters):
        return "filtered"
    return "kept"


def passes(row: dict, f: FilterConfig) -> bool:
    """Whether `row` passes the filter; a missing field (or null) fails it, as does a non-number for min/max."""
    value = row
    for key in f.field.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            return False
        value = value[key]
    if f.one_of is not None and str(value) not in f.one_of:
        return False
    if f.min is not None or f.max is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if (f.min is not None and value < f.min) or (f.max is not None and value > f.max):
            return False
    return True


def is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: undecodable source bytes, or JSON escapes like \\ud800."""
    if text.isascii():  # the common case, checked without a copy
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
