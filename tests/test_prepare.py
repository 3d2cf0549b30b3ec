"""Preparing datasets: sources (Hub, parquet, jsonl, jsonl.zst, txt) -> GPT-2 ids -> resumable shards."""

import json
import shlex
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gptlab.data import prepare
from gptlab.data.config import DataConfig, FilterConfig, PrepareConfig
from gptlab.data.prepare import STATE, is_validation, prepare_dataset
from gptlab.data.shards import MANIFEST, read_doc_starts, read_manifest, read_shard
from gptlab.data.tokenizer import EOT
from gptlab.errors import DataError
from tests.conftest import ROOT

# Real English without I/O (pydoc's help topics), after a document that is not ASCII.
TEXTS = ["naïve café — 日本語テキスト, emoji 🤖, Ελληνικά\n\n  tabs\t!", *(text for _, text in sorted(topics.items()))]
SETS = ["RedPajamaC4", "RedPajamaWikipedia", "RedPajamaGithub", "RedPajamaArXiv"]


def text(i: int) -> str:
    """Document i: a piece of TEXTS of varied length (up to about 200 tokens)."""
    body = TEXTS[i % len(TEXTS)]
    start = (i * 37) % (len(body) // 2 + 1)
    return body[start : start + 80 + (i * 97) % 700]


def fineweb_edu_rows(n: int, first: int = 0) -> list[dict]:
    return [
        {
            "text": text(i),
            "id": f"<urn:uuid:{i:08d}-0000-4000-8000-000000000000>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/page/{i}",
            "date": "2024-02-25T01:02:03Z",
            "file_path": "s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/0/warc/0.warc.gz",
            "language": "en",
            "language_score": 0.9 + (i % 10) / 100,
            "token_count": len(text(i)) // 4,
            "score": 2.0 + (i % 4) / 2,
            "int_score": 2 + i % 3,
        }
        for i in range(first, first + n)
    ]


def slimpajama_rows(n: int, first: int = 0) -> list[dict]:
    return [{"text": text(i), "meta": {"redpajama_set_name": SETS[i % len(SETS)]}} for i in range(first, first + n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups per file
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if path.name.endswith(".zst") else data)
    return path


def config(source, folder, prepare_cfg: dict | None = None, **data) -> DataConfig:
    """FineWeb-Edu settings with tiny shards, a large validation share and one tokenizer process."""
    settings = {"workers": 1, "shard_tokens": 500} | (prepare_cfg or {})
    return DataConfig(
        **{"name": "fineweb_edu", "source": str(source), "dir": str(folder), "val_fraction": 0.25} | data,
        prepare=PrepareConfig(**settings),
    )


def split_docs(folder: Path, split: str) -> list[list[int]]:
    """A split's documents as the loader sees them: its shards concatenated in manifest order."""
    pieces, starts, offset = [], [], 0
    for entry in read_manifest(folder)["shards"]:
        if entry["split"] == split:
            shard = np.asarray(read_shard(folder / entry["file"]))
            pieces.append(shard)
            starts += (read_doc_starts(folder / entry["file"]) + offset).tolist()
            offset += len(shard)
    tokens = np.concatenate(pieces).tolist() if pieces else []
    assert (starts[:1] or [0]) == [0] and all(tokens[s] == EOT for s in starts)
    bounds = [*starts, len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds, bounds[1:])]


def encoded(gpt2, rows: list[dict]) -> list[list[int]]:
    return [[EOT, *gpt2.encode_ordinary(row["text"])] for row in rows]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fineweb_edu_parquet_folder_gives_tiktoken_ids_split_by_id(tmp_path, tiktoken_gpt2):
    rows = fineweb_edu_rows(60)
    write_parquet(tmp_path / "src" / "data" / "000_00000.parquet", rows[:35])
    write_parquet(tmp_path / "src" / "data" / "001_00000.parquet", rows[35:])
    (tmp_path / "src" / "README.md").write_text("not a document")
    (tmp_path / "src" / ".cache").mkdir()
    (tmp_path / "src" / ".cache" / "partial.parquet").write_bytes(b"an interrupted download")

    out = tmp_path / "out"
    manifest = prepare_dataset(config(tmp_path / "src", out))

    val = [row for row in rows if is_validation(row["id"], 0.25)]
    train = [row for row in rows if not is_validation(row["id"], 0.25)]
    assert val and train  # disjoint by construction; together, every row
    assert split_docs(out, "train") == encoded(tiktoken_gpt2, train)
    assert split_docs(out, "val") == encoded(tiktoken_gpt2, val)
    assert manifest["source"]["files"] == {"train+val": ["data/000_00000.parquet", "data/001_00000.parquet"]}
    assert manifest["documents"]["train"] == {
        "kept": len(train), "filtered": 0, "skipped_empty": 0, "skipped_non_utf8": 0
    }  # fmt: skip
    assert manifest["documents"]["val"]["kept"] == len(val)
    train_shards = [e for e in manifest["shards"] if e["split"] == "train"]
    assert len(train_shards) > 2 and all(e["tokens"] == 500 for e in train_shards[:-1])  # documents span shards
    assert manifest == read_manifest(out) and not (out / STATE).exists()
    assert prepare_dataset(config(tmp_path / "src", out)) == manifest  # a finished folder is left alone


def test_jsonl_and_parquet_of_the_same_rows_give_the_same_shards(tmp_path):
    rows = fineweb_edu_rows(40)
    prepare_dataset(config(write_parquet(tmp_path / "rows.parquet", rows), tmp_path / "a"))
    prepare_dataset(config(write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "b"))
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert a.pop(MANIFEST) != b.pop(MANIFEST) and a == b  # only the listed source file differs


def test_slimpajama_zst_takes_val_from_its_validation_files_and_filters_by_set(tmp_path, tiktoken_gpt2):
    train = slimpajama_rows(30) + [{"text": "a row with no meta"}]
    val = slimpajama_rows(12, first=100)
    write_jsonl(tmp_path / "train" / "chunk1" / "example_train_0.jsonl.zst", train[:20])
    write_jsonl(tmp_path / "train" / "chunk2" / "example_train_1.jsonl.zst", train[20:])
    write_jsonl(tmp_path / "validation" / "chunk1" / "example_holdout_0.jsonl.zst", val)
    keep = ["RedPajamaC4", "RedPajamaWikipedia"]
    cfg = config(
        tmp_path / "train",
        tmp_path / "out",
        {"filters": [FilterConfig(field="meta.redpajama_set_name", one_of=keep)]},
        name="slimpajama",
        val_source=str(tmp_path / "validation"),
        id_field=None,
    )
    manifest = prepare_dataset(cfg)

    def kept(rows):
        return [row for row in rows if row.get("meta", {}).get("redpajama_set_name") in keep]

    assert split_docs(tmp_path / "out", "train") == encoded(tiktoken_gpt2, kept(train))
    assert split_docs(tmp_path / "out", "val") == encoded(tiktoken_gpt2, kept(val))
    counts = manifest["documents"]
    assert (counts["train"]["kept"], counts["train"]["filtered"]) == (len(kept(train)), len(train) - len(kept(train)))
    assert (counts["val"]["kept"], counts["val"]["filtered"]) == (len(kept(val)), len(val) - len(kept(val)))
    assert manifest["source"]["files"] == {
        "val": ["chunk1/example_holdout_0.jsonl.zst"],
        "train": ["chunk1/example_train_0.jsonl.zst", "chunk2/example_train_1.jsonl.zst"],
    }


def slimpajama_tree(root: Path, validation: bool = True) -> tuple[list[dict], list[dict]]:
    """SlimPajama-627B's local layout (train/chunkN/example_train_N.jsonl.zst, validation/chunkN/example_holdout_N...);
    returns its training and validation rows."""
    train, val = slimpajama_rows(30), slimpajama_rows(12, first=100)
    write_jsonl(root / "train" / "chunk1" / "example_train_0.jsonl.zst", train)
    if validation:
        write_jsonl(root / "validation" / "chunk1" / "example_holdout_0.jsonl.zst", val)
    return train, val


def slimpajama_config(source, folder, *overrides: str) -> DataConfig:
    """conf/data/slimpajama.yaml (val_source: validation) on local files, tiny shards, one tokenizer process."""
    from gptlab.config import load_data_config
    from tests.conftest import compose_root

    settings = ["data.prepare.workers=1", "data.prepare.shard_tokens=500", *overrides]
    return load_data_config(compose_root("prepare", ["data=slimpajama", f"data.source={source}", f"data.dir={folder}",
                                                     *settings]))  # fmt: skip


@pytest.mark.parametrize(
    "source,train_files",
    [
        ("SlimPajama-627B/train", ["chunk1/example_train_0.jsonl.zst"]),  # relative to the working directory
        ("{tmp}/SlimPajama-627B/train/chunk1", ["example_train_0.jsonl.zst"]),
        ("{tmp}/SlimPajama-627B/train/*/*.jsonl.zst", ["chunk1/example_train_0.jsonl.zst"]),
        ("{tmp}/SlimPajama-627B/train/chunk1/example_train_0.jsonl.zst", ["example_train_0.jsonl.zst"]),
    ],
)
def test_slimpajama_local_layout_takes_val_from_the_validation_folder_beside_train(
    tmp_path, monkeypatch, tiktoken_gpt2, source, train_files
):
    train, val = slimpajama_tree(tmp_path / "SlimPajama-627B")
    monkeypatch.chdir(tmp_path)
    cfg = slimpajama_config(source.format(tmp=tmp_path), tmp_path / "out")
    assert cfg.val_source == "validation"  # the hub split's name, as conf/data/slimpajama.yaml sets it
    manifest = prepare_dataset(cfg)
    assert manifest["source"]["files"] == {"val": ["chunk1/example_holdout_0.jsonl.zst"], "train": train_files}
    assert split_docs(tmp_path / "out", "val") == encoded(tiktoken_gpt2, val)
    assert split_docs(tmp_path / "out", "train") == encoded(tiktoken_gpt2, train)


def test_slimpajama_local_files_without_a_validation_folder_say_how_to_choose_one(tmp_path):
    slimpajama_tree(tmp_path / "SlimPajama-627B", validation=False)
    with pytest.raises(DataError) as err:
        prepare_dataset(slimpajama_config(tmp_path / "SlimPajama-627B" / "train", tmp_path / "out"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.val_source=validation: ")
    assert f"a folder validation beside {tmp_path}/SlimPajama-627B/train or above it" in message
    assert "set data.val_source=<path of the validation files>, or data.val_source=null to hold out " in message
    assert "data.val_fraction=0.0005 of the documents" in message
    assert not (tmp_path / "out").exists()


def test_a_validation_folder_found_above_the_training_files_must_not_hold_them(tmp_path):
    write_jsonl(tmp_path / "validation" / "chunk1" / "example_holdout_0.jsonl.zst", slimpajama_rows(3))
    with pytest.raises(DataError, match="data.val_source=validation overlaps the training data"):
        prepare_dataset(slimpajama_config(tmp_path / "validation" / "chunk1", tmp_path / "out"))


def test_int_score_filter_drops_and_counts(tmp_path, tiktoken_gpt2):
    rows = fineweb_edu_rows(30)
    rows[0]["int_score"] = None  # a missing value fails the filter
    source = write_parquet(tmp_path / "rows.parquet", rows)
    manifest = prepare_dataset(config(source, tmp_path / "out", {"filters": [FilterConfig(field="int_score", min=3)]}))
    passing = [row for row in rows if row["int_score"] is not None and row["int_score"] >= 3]
    train = [row for row in passing if not is_validation(row["id"], 0.25)]
    assert split_docs(tmp_path / "out", "train") == encoded(tiktoken_gpt2, train)
    assert sum(c["filtered"] for c in manifest["documents"].values()) == len(rows) - len(passing)
    assert sum(c["kept"] for c in manifest["documents"].values()) == len(passing)


def test_max_docs_and_max_tokens_stop_the_training_split(tmp_path, tiktoken_gpt2):
    rows = fineweb_edu_rows(60)
    source = write_parquet(tmp_path / "rows.parquet", rows)
    train = [row for row in rows if not is_validation(row["id"], 0.25)]

    manifest = prepare_dataset(config(source, tmp_path / "docs", {"max_docs": 10}))
    assert split_docs(tmp_path / "docs", "train") == encoded(tiktoken_gpt2, train[:10])
    assert manifest["documents"]["train"]["kept"] == 10

    prepare_dataset(config(source, tmp_path / "tokens", {"max_tokens": 1200}))
    docs = split_docs(tmp_path / "tokens", "train")
    assert docs == encoded(tiktoken_gpt2, train[: len(docs)])
    assert sum(map(len, docs)) >= 1200 > sum(map(len, docs[:-1]))  # stops after the document that reaches it


@pytest.mark.slow
def test_two_workers_write_the_same_bytes_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_DOCS", 4)  # many small tasks in flight at once
    source = write_parquet(tmp_path / "rows.parquet", fineweb_edu_rows(60))
    prepare_dataset(config(source, tmp_path / "one"))
    prepare_dataset(config(source, tmp_path / "two", {"workers": 2}))
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


def bad_input(tmp_path: Path, case: str) -> DataConfig:
    """Settings whose source is wrong in the way `case` says."""
    if case == "json":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "fine", "id": "1"}\n\n{"text": "fine", "id": "2"}\n{"text": "broken\n')
    elif case == "parquet":
        (path := tmp_path / "bad.parquet").write_bytes(b"PAR1 but not really")
    elif case == "zstd":
        (path := tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    elif case == "no_file":
        path = tmp_path / "nothing" / "*.parquet"
    elif case == "overlap":
        path = write_jsonl(tmp_path / "train" / "0.jsonl", slimpajama_rows(3))
        return config(path, tmp_path / "out", val_source=str(tmp_path / "train"), id_field=None)
    elif case == "no_text":
        path = write_jsonl(tmp_path / "rows.jsonl", [{"content": "the text is elsewhere", "id": "1"}])
    else:  # no id column
        path = write_parquet(tmp_path / "rows.parquet", [{"text": "a document"}])
    return config(path, tmp_path / "out")


@pytest.mark.parametrize(
    "case,message",
    [
        ("json", r"bad\.jsonl:4: not valid JSON"),
        ("parquet", r"bad\.parquet: not a valid parquet file"),
        ("zstd", r"bad\.jsonl\.zst: not a valid zstd file"),
        ("no_file", r"nothing/\*\.parquet: matches no \.parquet, \.jsonl, \.jsonl\.zst, \.txt file"),
        ("overlap", r"data\.val_source=.*/train overlaps the training data"),
        ("no_text", r"rows\.jsonl:1: no field 'text' \(data\.text_field\)"),
        ("no_id", r"rows\.parquet: no column 'id' \(data\.id_field\)"),
    ],
)
def test_bad_input_is_a_data_error_that_says_where(tmp_path, case, message):
    with pytest.raises(DataError, match=message):
        prepare_dataset(bad_input(tmp_path, case))
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_empty_and_non_utf8_documents_are_skipped_and_counted(tmp_path, tiktoken_gpt2):
    src = tmp_path / "src"
    src.mkdir()
    good = ["The first document.", "The second one, ", "A third, from a text file."]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": " \n\t "}).encode(),
        b'{"text": "invalid \xff\xfe bytes"}',
        b'{"text": "a lone \\ud800 surrogate"}',
        json.dumps({"text": good[1]}).encode(),
    ]
    (src / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "a.txt").write_text(good[2])
    (src / "b.txt").write_bytes(b"latin-1 text: caf\xe9")
    (src / "c.txt").write_text("")
    # 0.6: the smallest share that holds out one of the three (an empty split is an error)
    manifest = prepare_dataset(config(src, tmp_path / "out", name="local", id_field=None, val_fraction=0.6))
    totals = {key: sum(c[key] for c in manifest["documents"].values()) for key in manifest["documents"]["train"]}
    assert totals == {"kept": 3, "filtered": 0, "skipped_empty": 3, "skipped_non_utf8": 3}
    docs = split_docs(tmp_path / "out", "train") + split_docs(tmp_path / "out", "val")
    assert sorted(docs) == sorted(encoded(tiktoken_gpt2, [{"text": t} for t in good]))


class PowerCut(Exception):
    pass


def record_shard_writes(monkeypatch, crash_after: int | None = None) -> list[str]:
    """The names of the shards prepare writes from now on; with crash_after, it crashes after that many."""
    write_shard, written = prepare.write_shard, []

    def write(path, *args):
        if len(written) == crash_after:
            raise PowerCut
        written.append(path.name)
        return write_shard(path, *args)

    monkeypatch.setattr(prepare, "write_shard", write)
    return written


def hub_rows(monkeypatch, rows_of_split: dict[str, list[dict]]) -> list[dict]:
    """Serve `rows_of_split` as the Hub would; returns the recorded load_dataset calls."""
    calls = []

    def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "streaming": streaming, **kwargs})
        return datasets.Dataset.from_list(rows_of_split[split]).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("layout", ["held_out", "val_files", "hub"])
@pytest.mark.parametrize("crash_after", [1, 9, "last"])
def test_an_interrupted_prepare_resumes_to_the_same_bytes(tmp_path, monkeypatch, layout, crash_after):
    some = FilterConfig(field="language_score", min=0.92)
    if layout == "held_out":
        cfg = {"source": write_parquet(tmp_path / "rows.parquet", fineweb_edu_rows(80))}
    elif layout == "val_files":
        write_jsonl(tmp_path / "train" / "0.jsonl.zst", slimpajama_rows(50))
        write_jsonl(tmp_path / "validation" / "0.jsonl.zst", slimpajama_rows(25, first=50))
        cfg = {"source": tmp_path / "train", "val_source": str(tmp_path / "validation"), "id_field": None}
        some = FilterConfig(field="meta.redpajama_set_name", one_of=SETS[:3])
    else:
        hub_rows(monkeypatch, {"train": fineweb_edu_rows(80)})
        cfg = {"source": "HuggingFaceFW/fineweb-edu", "hub_config": "sample-10BT"}
    settings = {"shard_tokens": 300, "filters": [some]}  # a shard of 300 tokens ends inside most documents
    whole = prepare_dataset(config(folder=tmp_path / "whole", prepare_cfg=settings, **cfg))
    if crash_after == "last":  # between the last shards of the splits
        crash_after = len(whole["shards"]) - 1

    with monkeypatch.context() as crash:
        record_shard_writes(crash, crash_after)
        with pytest.raises(PowerCut):
            prepare_dataset(config(folder=tmp_path / "resumed", prepare_cfg=settings, **cfg))
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    state = json.loads((tmp_path / "resumed" / STATE).read_text())
    finished = {entry["file"] for split in state["progress"].values() for entry in split["shards"]}
    (tmp_path / "resumed" / ".train_000009.bin.tmp4242").write_bytes(b"half a shard")  # as a crash mid-write leaves

    rewritten = record_shard_writes(monkeypatch)
    manifest = prepare_dataset(config(folder=tmp_path / "resumed", prepare_cfg=settings, **cfg))
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")  # no state, no temporary file
    assert finished and sorted(rewritten) == sorted({e["file"] for e in manifest["shards"]} - finished)


def test_a_finished_shard_that_fails_verification_is_written_again(tmp_path, monkeypatch):
    source = write_parquet(tmp_path / "rows.parquet", fineweb_edu_rows(40))
    whole = prepare_dataset(config(source, tmp_path / "whole"))
    with monkeypatch.context() as crash:
        record_shard_writes(crash, crash_after=2)
        with pytest.raises(PowerCut):
            prepare_dataset(config(source, tmp_path / "out"))
    shard = tmp_path / "out" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\0\0")
    rewritten = record_shard_writes(monkeypatch)
    prepare_dataset(config(source, tmp_path / "out"))
    assert len(rewritten) == len(whole["shards"]) and folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "whole")


def test_resuming_with_other_settings_is_refused(tmp_path, monkeypatch):
    source = write_parquet(tmp_path / "rows.parquet", fineweb_edu_rows(40))
    record_shard_writes(monkeypatch, crash_after=1)
    with pytest.raises(PowerCut):
        prepare_dataset(config(source, tmp_path / "out"))
    monkeypatch.undo()
    with pytest.raises(DataError, match="unfinished prepare of another source or other settings"):
        prepare_dataset(config(source, tmp_path / "out", {"max_docs": 5}))


def test_hub_datasets_are_streamed_with_their_config_and_splits(tmp_path, monkeypatch, tiktoken_gpt2):
    rows = fineweb_edu_rows(30)
    calls = hub_rows(monkeypatch, {"train": rows})
    manifest = prepare_dataset(config("HuggingFaceFW/fineweb-edu", tmp_path / "edu", hub_config="sample-10BT"))
    assert calls == [{"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train", "streaming": True}]
    train = [r for r in rows if not is_validation(r["id"], 0.25)]
    assert split_docs(tmp_path / "edu", "train") == encoded(tiktoken_gpt2, train)
    assert manifest["source"]["splits"] == {"train+val": "train"}

    train, val = slimpajama_rows(20), slimpajama_rows(8, first=20)
    calls = hub_rows(monkeypatch, {"train": train, "validation": val})
    cfg = config("DKYoon/SlimPajama-6B", tmp_path / "sp", name="slimpajama", val_source="validation", id_field=None)
    prepare_dataset(cfg)
    assert [(c["path"], c["name"], c["split"], c["streaming"]) for c in calls] == [
        ("DKYoon/SlimPajama-6B", None, "validation", True),
        ("DKYoon/SlimPajama-6B", None, "train", True),
    ]
    assert split_docs(tmp_path / "sp", "val") == encoded(tiktoken_gpt2, val)
    assert split_docs(tmp_path / "sp", "train") == encoded(tiktoken_gpt2, train)


def test_a_dataset_missing_from_the_hub_is_a_data_error(tmp_path, monkeypatch):
    def load_dataset(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match="HuggingFaceFW/fineweb-edu-typo .*cannot stream it from the Hugging Face Hub"):
        prepare_dataset(config("HuggingFaceFW/fineweb-edu-typo", tmp_path / "out"))


def run_script(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = ROOT / "scripts" / "prepare_data.py"
    cmd = [sys.executable, str(script), f"paths.output_root={tmp_path}/outputs", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow
def test_script_prepares_local_parquet_once(tmp_path):
    source = write_parquet(tmp_path / "rows.parquet", fineweb_edu_rows(40))
    args = [
        "data=fineweb_edu",
        f"data.source={source}",
        f"data.dir={tmp_path / 'out'}",
        "data.val_fraction=0.25",
        "data.prepare.workers=1",
        "data.prepare.shard_tokens=1000",
    ]
    first = run_script(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 local file(s)" in first.stdout and "Prepared" in first.stdout
    manifest = read_manifest(tmp_path / "out")
    assert manifest["documents"]["train"]["kept"] + manifest["documents"]["val"]["kept"] == 40
    second = run_script(tmp_path, *args)
    assert second.returncode == 0 and "already prepared" in second.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("data.source={tmp}/missing.parquet", "Data error: {tmp}/missing.parquet: matches no"),
        ("data.prepare.workers=0", "Config error: data.prepare.workers: must be >= 1"),
    ],
)
def test_script_reports_bad_input_in_one_line_and_exits_2(tmp_path, override, message):
    proc = run_script(tmp_path, "data=fineweb_edu", f"data.dir={tmp_path / 'out'}", override.format(tmp=tmp_path))
    assert proc.returncode == 2
    assert message.format(tmp=tmp_path) in proc.stderr and "Traceback" not in proc.stderr


def test_script_on_slimpajama_without_its_validation_folder_fails_in_one_line_whose_ways_out_run(tmp_path):
    root = tmp_path / "SlimPajama-627B"
    train, val = slimpajama_tree(root, validation=False)
    write_jsonl(tmp_path / "heldout" / "chunk1" / "example_holdout_0.jsonl.zst", val)
    args = ["data=slimpajama", f"data.source={root / 'train'}", "data.prepare.workers=1"]
    failed = run_script(tmp_path, *args, f"data.dir={tmp_path / 'failed'}")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("Data error: data.val_source=validation: ")
    ways_out = {"data.val_source=<path of the validation files>": tmp_path / "heldout", "data.val_source=null": None}
    for way_out, val_source in ways_out.items():
        assert way_out in line
        out = tmp_path / f"out_{val_source is None}"
        override = way_out.replace("<path of the validation files>", str(val_source))
        # 30 documents: the default val_fraction would hold out none, an error that names a larger one
        larger = ["data.val_fraction=0.2"] if val_source is None else []
        proc = run_script(tmp_path, *args, override, *larger, f"data.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = read_manifest(out)["documents"]
        if val_source is None:  # val: data.val_fraction of the training documents
            assert counts["train"]["kept"] + counts["val"]["kept"] == len(train)
        else:
            assert (counts["train"]["kept"], counts["val"]["kept"]) == (len(train), len(val))


@pytest.mark.slow
def test_the_prepare_command_that_training_names_prepares_local_slimpajama(tmp_path):
    from gptlab.config import load_config
    from gptlab.data.datamodule import TokenDataModule
    from gptlab.data.shards import ShardError
    from tests.conftest import compose_train

    train, val = slimpajama_tree(tmp_path / "SlimPajama-627B")
    overrides = ["data=slimpajama", f"data.source={tmp_path / 'SlimPajama-627B' / 'train'}"]
    cfg, plan = load_config(compose_train(overrides, data_dir=tmp_path / "data"))
    with pytest.raises(ShardError, match="Prepare it first") as err:
        TokenDataModule(cfg.data, cfg.eval, plan, seed=0).prepare_data()
    command = shlex.split(str(err.value).splitlines()[-1])
    assert command[:2] == ["python", "scripts/prepare_data.py"]
    proc = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = read_manifest(Path(cfg.data.dir))["documents"]
    assert (counts["train"]["kept"], counts["val"]["kept"]) == (len(train), len(val))
