"""Token shards written by llm.c / modded-nanogpt: indexed in place (never written), trained on, and the rule that
gptlab never writes a dataset into a folder holding other files; every "prepare it first" command runs."""

import dataclasses
import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.config import load_config
from gptlab.data.commands import prepare_command
from gptlab.data.config import DataConfig, FilterConfig, PrepareConfig
from gptlab.data.datamodule import TokenDataModule, unprepared_error
from gptlab.data.index import layout
from gptlab.data.loader import SequentialBatches, TokenWindows
from gptlab.data.prepare import STATE, prepare_dataset
from gptlab.data.shards import MANIFEST, ShardError, check_dataset, read_manifest
from gptlab.data.shuffle import ShuffledBatches
from gptlab.data.tokenizer import EOT, RANKS_SHA256
from gptlab.errors import ConfigError, DataError
from gptlab.train import run
from tests.conftest import ROOT, compose_train

SHARD_SIZE = 1000


# ---- shards as llm.c writes them


def write_datafile(filename, toks):
    """llm.c's dev/data/data_common.py write_datafile for model_desc="gpt-2": 256 int32 of header, uint16 tokens."""
    assert len(toks) < 2**31, "token count too large"
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520  # magic
    header[1] = 1  # version
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def write_like_llm_c(folder, docs, shard_size=SHARD_SIZE, name="fineweb"):
    """The main loop of llm.c's dev/data/fineweb.py (modded-nanogpt's data/fineweb.py is the same): documents packed
    into shards of exactly shard_size tokens, shard 0 is val, a document that does not fit continues in the next."""
    folder.mkdir(parents=True, exist_ok=True)
    shard_index = 0
    all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
    token_count = 0
    for tokens in docs:
        if token_count + len(tokens) < shard_size:
            all_tokens_np[token_count : token_count + len(tokens)] = tokens
            token_count += len(tokens)
        else:
            split = "val" if shard_index == 0 else "train"
            filename = folder / f"{name}_{split}_{shard_index:06d}.bin"
            remainder = shard_size - token_count
            all_tokens_np[token_count : token_count + remainder] = tokens[:remainder]
            write_datafile(filename, all_tokens_np)
            shard_index += 1
            all_tokens_np[0 : len(tokens) - remainder] = tokens[remainder:]
            token_count = len(tokens) - remainder
    if token_count != 0:
        split = "val" if shard_index == 0 else "train"
        write_datafile(folder / f"{name}_{split}_{shard_index:06d}.bin", all_tokens_np[:token_count])


def documents(carried: bool, n: int = 110, seed: int = 0) -> list[np.ndarray]:
    """GPT-2 ids of n documents of 20-150 tokens, each preceded by <|endoftext|>. carried=False: the val shard
    ends exactly at a document's end (the first train shard starts with a document); True: inside one."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 150, size=n)
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, SHARD_SIZE))  # the document that crosses the end of the val shard
    before = int(ends[k - 1])
    lengths[k] = SHARD_SIZE - before + (37 if carried else 0)
    return [np.array([EOT, *rng.integers(0, EOT, size=int(m) - 1)], dtype=np.uint16) for m in lengths]


def llmc_folder(tmp_path, carried: bool, name: str = "llmc"):
    folder = tmp_path / name
    docs = documents(carried)
    write_like_llm_c(folder, docs)
    return folder, docs


def train_documents(docs) -> list[np.ndarray]:
    """The documents that start after the val shard: the train split's."""
    starts = np.cumsum([0, *map(len, docs)])[:-1]
    return [d for d, s in zip(docs, starts) if s >= SHARD_SIZE]


def fingerprint(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def index(source, folder, name="local") -> dict:
    cfg = DataConfig(name=name, source=str(source), dir=str(folder), prepare=PrepareConfig(workers=1))
    return prepare_dataset(cfg)


# ---- indexing and reading


@pytest.mark.parametrize("carried", [False, True], ids=["aligned", "carried_over"])
def test_llmc_shards_are_indexed_in_place_and_read_exactly(tmp_path, carried):
    source, docs = llmc_folder(tmp_path, carried)
    assert (np.fromfile(source / "fineweb_train_000001.bin", np.uint16)[512] == EOT) != carried
    before = fingerprint(source)
    manifest = index(source, tmp_path / "data" / "local")
    assert fingerprint(source) == before  # nothing written, nothing changed
    assert sorted(p.name for p in (tmp_path / "data" / "local").iterdir()) == sorted(
        [MANIFEST, *(name.replace(".bin", ".idx") for name in before)]
    )
    entries = manifest["shards"]
    assert [e["split"] for e in entries] == ["val"] + ["train"] * (len(entries) - 1)
    assert all(e["file"] == str(source / e["index"].replace(".idx", ".bin")) for e in entries)
    assert entries[1].get("start", 0) == (37 if carried else 0) == manifest["left_out_tokens"]["train"]
    check_dataset(tmp_path / "data" / "local", RANKS_SHA256, verify_checksums=True)

    stream = np.concatenate(docs)
    train = np.concatenate(train_documents(docs))
    assert len(train) == len(stream) - SHARD_SIZE - (37 if carried else 0)
    # Unshuffled: the train tokens in order, each shard cut into whole windows (windows never span two shards).
    windows = TokenWindows(tmp_path / "data" / "local", "train", 16)
    batches = SequentialBatches(windows, batch_size=1)
    x = torch.cat([batches[i][0] for i in range(len(batches))]).flatten().numpy()
    pieces, at = [], 0
    for shard in windows.shards:
        pieces.append(train[at : at + (len(shard) - 1) // 16 * 16])
        at += len(shard)
    assert at == len(train) and x.tolist() == np.concatenate(pieces).tolist()
    val = TokenWindows(tmp_path / "data" / "local", "val", 16)
    assert val.get(np.arange(3))[0].flatten().tolist() == stream[:48].tolist()
    # Shuffled: the epoch is the train documents, each once and whole (the last one read may be cut short), never
    # the piece carried over from the val shard.
    ds = ShuffledBatches(tmp_path / "data" / "local", 16, 1, seed=0)
    x = torch.cat([ds[i][0] for i in range(len(ds))]).flatten().numpy()
    assert x[0] == EOT and len(x) == (len(train) - 1) // 16 * 16
    read = [tuple(d) for d in np.split(x, np.flatnonzero(x == EOT)[1:])]
    expected = {tuple(d) for d in train_documents(docs)}
    assert len(set(read)) == len(read) == len(expected) and set(read[:-1]) <= expected
    assert any(d[: len(read[-1])] == read[-1] for d in expected - set(read))


def test_index_beside_the_shards_adds_only_the_manifest_and_indexes(tmp_path):
    """data.dir = the shards' folder asks for the index beside them: names relative, the folder can move."""
    source, docs = llmc_folder(tmp_path, carried=True)
    before = fingerprint(source)
    manifest = index(source, source)
    after = fingerprint(source)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted([MANIFEST, *(n.replace(".bin", ".idx") for n in before)])
    assert all("/" not in e["file"] for e in manifest["shards"])
    moved = source.rename(tmp_path / "moved")
    check_dataset(moved, RANKS_SHA256, verify_checksums=True)
    x, _ = ShuffledBatches(moved, 16, 4, seed=0)[0]
    assert x.shape == (4, 16)


def test_layouts_names_gaps_and_documents_longer_than_a_shard(tmp_path):
    """llm.c's tinyshakespeare naming (<name>_val.bin, <name>_train.bin, the train file starting mid-document); a
    gap in the numbering (the shard after it starts inside a document whose start is missing); a document that
    fills a whole shard."""
    small = tmp_path / "tiny"
    small.mkdir()
    stream = np.concatenate(documents(carried=True, n=40))
    write_datafile(small / "tiny_shakespeare_val.bin", stream[:300])
    write_datafile(small / "tiny_shakespeare_train.bin", stream[300:])
    manifest = index(small, tmp_path / "tiny_index")
    first_eot = int(np.flatnonzero(stream[300:] == EOT)[0])
    assert [(e["split"], e.get("start", 0)) for e in manifest["shards"]] == [("val", 0), ("train", first_eot)]

    gaps = tmp_path / "gaps"
    gaps.mkdir()
    long_doc = np.array([EOT, *range(1, 2500)], dtype=np.uint16)
    doc = int(np.flatnonzero(stream[500:] == EOT)[0]) + 500  # a document start
    parts = {
        "x_val_000000.bin": stream[:500],
        "x_train_000001.bin": long_doc[:1000],
        "x_train_000002.bin": long_doc[1000:2000],  # all inside the document begun in shard 1
        "x_train_000003.bin": np.concatenate([long_doc[2000:], stream[doc : doc + 300]]),
        "x_train_000005.bin": stream[810:1500],  # after a gap: starts inside a document
    }
    for name, tokens in parts.items():
        write_datafile(gaps / name, tokens)
    manifest = index(gaps, tmp_path / "gaps_index")
    starts = [e.get("start", 0) for e in manifest["shards"]]
    assert starts == [0, 0, 0, 0, int(np.flatnonzero(stream[810:1500] == EOT)[0])]
    shuffled = ShuffledBatches(tmp_path / "gaps_index", 16, 1, seed=0)
    doc_starts = shuffled.stream.tokens.doc_starts
    lengths = np.diff(doc_starts)
    assert doc_starts[0] == 0 and len(long_doc) in lengths  # the long document is one document, read whole
    tokens = shuffled.stream.tokens.read(doc_starts[:-1], lengths)
    assert (tokens[doc_starts[:-1]] == EOT).all()  # every document starts with <|endoftext|>


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: write_datafile(d / "notes.bin", np.arange(5)), "cannot tell the split of notes.bin"),
        (lambda d: write_datafile(d / "edu_fineweb_train_000001.bin", np.arange(5)), "shards of 2 datasets"),
        (lambda d: (d / "fineweb_train_000099.bin").write_bytes(b"\0" * 2048), "not a token shard"),
        (lambda d: [p.unlink() for p in d.glob("*_val_*")], "no val shard"),
    ],
    ids=["unnamed", "two_datasets", "bad_magic", "no_val"],
)
def test_folders_that_cannot_be_indexed_are_refused_in_one_line(tmp_path, make, message):
    source, _ = llmc_folder(tmp_path, carried=True)
    make(source)
    with pytest.raises(DataError, match=message) as err:
        index(source, tmp_path / "index")
    assert "\n" not in str(err.value)


def test_llm_c_eval_files_and_non_gpt2_ids_are_named(tmp_path):
    source, _ = llmc_folder(tmp_path, carried=True)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240522, 1, 0)
    (source / "fineweb_train_000099.bin").write_bytes(header.tobytes())
    with pytest.raises(ShardError, match="magic 20240522: llm.c's evaluation-data format"):
        index(source, tmp_path / "a")
    write_datafile(source / "fineweb_train_000099.bin", np.array([EOT, 50257, 3]))
    with pytest.raises(DataError, match="token id 50257, not a GPT-2 id"):
        index(source, tmp_path / "b")
    (source / "fineweb_train_000099.bin").unlink()
    manifest = index(f"{source}/fineweb_*.bin", tmp_path / "c")  # a glob works as well as the folder
    assert len(manifest["shards"]) == len(layout(str(source)))


def test_altered_shards_are_refused_before_training(tmp_path):
    source, _ = llmc_folder(tmp_path, carried=True)
    index(source, tmp_path / "index")
    shard = source / "fineweb_train_000002.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256 differs"):
        check_dataset(tmp_path / "index", RANKS_SHA256, verify_checksums=True)


@pytest.mark.parametrize("carried", [False, True], ids=["aligned", "carried_over"])
def test_trains_on_llmc_shards_through_the_entry_point(tmp_path, carried, one_thread):
    source, _ = llmc_folder(tmp_path, carried)
    before = fingerprint(source)
    overrides = ["data=local", f"data.source={source}", "debug=smoke", "logger=none", "data.prepare.workers=1"]
    with pytest.raises(ShardError, match=r"holds no prepared dataset. Prepare it first:\s+python scripts/prepare_data"):
        run(compose_train(overrides, tmp_path / "run0", tmp_path / "data"))
    index(source, tmp_path / "data" / "local")
    summary = run(compose_train([*overrides, f"data.shuffle={not carried}"], tmp_path / "run", tmp_path / "data"))
    assert summary["status"] == "completed" and summary["step"] == 2 and np.isfinite(summary["val_loss"])
    assert fingerprint(source) == before


# ---- never write into a folder that holds other data


def datamodule(overrides, data_dir=None) -> TokenDataModule:
    cfg, plan = load_config(compose_train(overrides, data_dir=data_dir))
    return TokenDataModule(cfg.data, cfg.eval, plan, seed=0)


def test_the_sample_is_never_written_into_a_folder_of_other_data(tmp_path):
    source, _ = llmc_folder(tmp_path, carried=True)
    before = fingerprint(source)
    with pytest.raises(ConfigError) as err:
        run(compose_train(["debug=smoke", "logger=none", f"data.dir={source}"], tmp_path / "run"))
    message = str(err.value)
    assert err.value.key == "data.dir" and "\n" not in message
    assert f"python scripts/prepare_data.py data=local data.source={source} data.dir={source}," in message
    assert fingerprint(source) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"data.dir: .*other holds other files \(notes.txt\) and no manifest.json"):
        datamodule([f"data.dir={other}"]).prepare_data()
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    # A documents prepare refuses it too, before writing anything (train_000000.bin stays the user's).
    (other / "train_000000.bin").write_bytes(b"mine")
    cfg = DataConfig(name="local", source=str(tmp_path / "nothing.txt"), dir=str(other))
    (tmp_path / "nothing.txt").write_text("a document")
    with pytest.raises(ConfigError, match="holds other files"):
        prepare_dataset(cfg)
    assert (other / "train_000000.bin").read_bytes() == b"mine"


def sample_refused(data_dir: Path) -> Exception | None:
    dm = datamodule([], data_dir=data_dir)
    return unprepared_error(dm.cfg, dm.folder, "data.dir")


def test_the_sample_goes_into_an_empty_new_or_unfinished_sample_folder(tmp_path, data_dir):
    assert sample_refused(tmp_path / "new") is None
    (tmp_path / "empty" / "sample").mkdir(parents=True)
    assert sample_refused(tmp_path / "empty") is None
    unfinished = tmp_path / "unfinished" / "sample"  # what an interrupted prepare leaves
    unfinished.mkdir(parents=True)
    for name in ("train_000000.bin", "train_000000.idx", STATE, f".val_000000.bin.tmp{1234}"):
        (unfinished / name).write_bytes(b"")
    assert sample_refused(tmp_path / "unfinished") is None
    datamodule([], data_dir=data_dir).prepare_data()  # a prepared sample folder is used as it is


@pytest.mark.slow
def test_an_interrupted_sample_prepare_is_finished_in_its_folder(tmp_path, data_dir):
    """The sample, prepared into a folder holding a finished shard but no state (killed right after writing it),
    comes out identical to the session's."""
    folder = tmp_path / "sample"
    folder.mkdir()
    (folder / "train_000000.bin").write_bytes((data_dir / "sample" / "train_000000.bin").read_bytes())
    datamodule([], data_dir=tmp_path).prepare_data()
    assert read_manifest(folder)["shards"] == read_manifest(data_dir / "sample")["shards"]


# ---- every suggested command works


def suggested_command(error: Exception) -> list[str]:
    """The prepare command an error message suggests, as an argument list."""
    command = re.search(r"python (scripts/prepare_data\.py .*?)(?:, then |$)", str(error)).group(1)
    return shlex.split(command)


def run_suggested(error: Exception) -> subprocess.CompletedProcess:
    words = suggested_command(error)
    proc = subprocess.run([sys.executable, *words], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_every_suggested_prepare_command_runs(tmp_path):
    source, _ = llmc_folder(tmp_path, carried=True)
    before = fingerprint(source)
    # Token shards, data.dir elsewhere: the index goes into data.dir.
    module = datamodule(["data=local", f"data.source={source}", f"data.dir={tmp_path / 'index'}"])
    with pytest.raises(ShardError) as err:
        module.prepare_data()
    assert "Indexed" in run_suggested(err.value).stdout
    module.prepare_data()
    # The issue's case, data.source = data.dir = the shards' folder: the index goes beside them.
    module = datamodule(["data=local", f"data.source={source}", f"data.dir={source}"])
    with pytest.raises(ShardError) as err:
        module.prepare_data()
    run_suggested(err.value)
    module.prepare_data()
    after = fingerprint(source)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(set(after) - set(before)) == sorted([MANIFEST, *(n.replace(".bin", ".idx") for n in before)])
    # The sample pointed at a folder of shards: the index command, then data=local trains there.
    other, _ = llmc_folder(tmp_path, carried=False, name="other")
    with pytest.raises(ConfigError) as err:
        datamodule([f"data.dir={other}"]).prepare_data()
    run_suggested(err.value)
    datamodule(["data=local", f"data.source={other}", f"data.dir={other}"]).prepare_data()
    # Documents with every key that decides what a prepare writes (a value with a space and a quote included).
    docs = tmp_path / "my docs"
    docs.mkdir()
    rows = [{"text": f"Document {i}, it's text number {i}." * 5, "score": i % 3} for i in range(60)]
    (docs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (docs / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    overrides = [
        "data=local", f"data.source='{docs}/train.jsonl'", f"data.val_source='{docs}/val.jsonl'",
        f"data.dir='{tmp_path}/it\\'s here'", "data.prepare.max_docs=40", "data.prepare.shard_tokens=300",
        "data.prepare.filters=[{field: score, min: 1}]", "data.prepare.workers=1",
    ]  # fmt: skip
    module = datamodule(overrides)
    with pytest.raises(ShardError) as err:
        module.prepare_data()
    assert f"data=local \"data.source='{docs}/train.jsonl'\" " in str(err.value)
    assert '"data.prepare.filters=[{field: score, min: 1.0}]"' in str(err.value)
    run_suggested(err.value)
    module.prepare_data()
    manifest = read_manifest(tmp_path / "it's here")
    assert manifest["prepare"]["max_docs"] == 40 and manifest["prepare"]["filters"][0]["min"] == 1


def test_prepare_commands_state_what_differs_from_the_option(tmp_path):
    local = DataConfig(name="local", source="/d/x.jsonl", dir="/data/local", val_fraction=0.001, id_field=None)
    command = prepare_command(local)
    assert command == "python scripts/prepare_data.py data=local data.source=/d/x.jsonl data.dir=/data/local"
    edu = DataConfig(
        name="fineweb_edu", source="HuggingFaceFW/fineweb-edu", hub_config="sample-100BT", dir="/data/e",
        prepare=PrepareConfig(max_tokens=10**9, filters=[FilterConfig(field="int_score", min=3)]),
    )  # fmt: skip
    assert prepare_command(edu) == (
        "python scripts/prepare_data.py data=fineweb_edu data.source=HuggingFaceFW/fineweb-edu data.dir=/data/e "
        "data.hub_config=sample-100BT data.prepare.max_tokens=1000000000 "
        '"data.prepare.filters=[{field: int_score, min: 3}]"'
    )
    shards = dataclasses.replace(local, source=str(llmc_folder(tmp_path, carried=True)[0]), val_fraction=0.5)
    assert prepare_command(shards).endswith(f"data=local data.source={shards.source} data.dir=/data/local")
