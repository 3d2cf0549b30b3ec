"""Shard format (llm.c compatible), dataset preparation, the built-in corpora and the sequential loader."""

import ast
import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from gptlab.data.loader import RangeSampler, SequentialBatches, TokenWindows, ValidationBatches
from gptlab.data.prepare import is_validation, write_split
from gptlab.data.shards import (
    HEADER_BYTES,
    ShardError,
    check_dataset,
    read_doc_starts,
    read_manifest,
    read_shard,
    write_shard,
)
from gptlab.data.tokenizer import EOT, RANKS_SHA256


def test_shard_layout_is_llm_c(tmp_path):
    tokens = np.array([EOT, 1, 2, 3, EOT, 65535], dtype=np.int64)
    write_shard(tmp_path / "train_000000.bin", tokens, np.array([0, 4]))
    raw = (tmp_path / "train_000000.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 6] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2").tolist() == tokens.tolist()
    assert read_shard(tmp_path / "train_000000.bin").tolist() == tokens.tolist()
    assert read_doc_starts(tmp_path / "train_000000.bin").tolist() == [0, 4]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_reads_a_shard_written_the_llm_c_way(tmp_path):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, 3)
    (tmp_path / "x.bin").write_bytes(header.tobytes() + np.array([7, 8, 9], dtype=np.uint16).tobytes())
    assert read_shard(tmp_path / "x.bin").tolist() == [7, 8, 9]


def test_damaged_shards_are_refused(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(10), np.array([0]))
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-2])
    with pytest.raises(ShardError, match="header promises"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "magic.bin").write_bytes(b"\0" * 8 + data[8:])
    with pytest.raises(ShardError, match="magic"):
        read_shard(tmp_path / "magic.bin")
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "big.bin", np.array([70000]), np.array([0]))
    assert not (tmp_path / "big.bin").exists()


def test_documents_are_packed_across_shards(tmp_path):
    docs = [np.array([EOT, *range(1, n)], dtype=np.uint16) for n in (4, 7, 2, 9)]
    entries = write_split(tmp_path, "train", docs, shard_tokens=5)
    assert [e["tokens"] for e in entries] == [5, 5, 5, 5, 2]
    stream = np.concatenate([read_shard(tmp_path / e["file"]) for e in entries])
    assert stream.tolist() == np.concatenate(docs).tolist()
    for e in entries:  # every indexed start is a document's <|endoftext|>
        shard = read_shard(tmp_path / e["file"])
        starts = read_doc_starts(tmp_path / e["file"])
        assert len(starts) == e["documents"] and all(shard[s] == EOT for s in starts)
    assert sum(e["documents"] for e in entries) == len(docs)


def test_sample_corpus_is_real_text_of_useful_size(sample_docs):
    docs = sample_docs
    assert 300 <= len(docs) and len({i for i, _ in docs}) == len(docs)
    assert any(i.startswith("pydoc:") for i, _ in docs) and any(i.startswith("module:") for i, _ in docs)
    assert sum(len(t) for _, t in docs) > 1_000_000  # characters: several hundred thousand tokens


def test_code_corpus_is_python_source_of_the_documented_size(code_docs):
    from gptlab.data.sample_corpus import MAX_CODE_FILE_CHARS, MIN_DOCUMENT_CHARS
    from gptlab.data.tokenizer import gpt2_tokenizer

    assert 250 <= len(code_docs) <= 450  # 345 on CPython 3.11 (the module docstring's figures)
    for doc_id, text in code_docs:
        assert MIN_DOCUMENT_CHARS <= len(text) <= MAX_CODE_FILE_CHARS, doc_id
        ast.parse(text, filename=doc_id)  # every document is a whole Python file as written
    assert sum("def " in text or "import " in text for _, text in code_docs) > 0.9 * len(code_docs)
    tokens = sum(len(t) for t in gpt2_tokenizer().encode_ordinary_batch([text for _, text in code_docs]))
    assert 1_000_000 <= tokens <= 2_000_000  # 1.42M on CPython 3.11, 2.26 characters per token


def test_code_corpus_ids_are_unique_sorted_and_split_as_the_sample(code_docs, sample_docs):
    """A module's source (sample_code) and its docstrings (sample) are held out together: neither corpus validates
    on text the other trains on."""
    from gptlab.data.sample_corpus import code_documents

    ids = [i for i, _ in code_docs]
    assert all(i.startswith("module:") and i.endswith(".py") for i in ids) and len(set(ids)) == len(ids)
    shared = set(ids) & {i for i, _ in sample_docs}
    assert len(shared) > 0.5 * len(ids)
    sample_val = {i for i, _ in sample_docs if is_validation(i, 0.05)}
    assert {i for i in ids if is_validation(i, 0.05)} & shared == sample_val & shared
    assert not any(part in ("encodings", "pydoc_data", "test") for i in ids for part in i[7:].split("/"))
    assert ids == sorted(ids, key=lambda i: i.split("/"))  # sorted by path, folder by folder
    assert code_documents() == code_docs  # the same documents in the same order, every time


def test_code_corpus_prepares_into_train_and_val_shards(tmp_path):
    from gptlab.config import load_data_config
    from gptlab.data import index, sources
    from gptlab.data.prepare import prepare_dataset
    from tests.conftest import compose_root

    folder = tmp_path / "sample_code"
    cfg = load_data_config(compose_root("prepare", ["data=sample_code", f"data.dir={folder}"]))
    (tmp_path / "stray.bin").touch()  # a built-in corpus never reads data.source, even one naming .bin files
    assert cfg.name == "sample_code" and not index.is_token_shards(dataclasses.replace(cfg, source=str(tmp_path)))
    assert [s.splits for s in sources.streams(cfg)] == [("train", "val")]
    manifest = prepare_dataset(cfg)
    assert manifest["source"]["name"] == "sample_code"
    tokens = {split: sum(e["tokens"] for e in manifest["shards"] if e["split"] == split) for split in ("train", "val")}
    assert tokens["train"] > 1_000_000 and tokens["val"] > 20_000  # 1.38M and 45k on CPython 3.11
    for e in manifest["shards"]:
        assert len(read_shard(folder / e["file"])) == e["tokens"]
        assert len(read_doc_starts(folder / e["file"])) == e["documents"]


def test_prepared_sample_matches_its_manifest(data_dir):
    folder = data_dir / "sample"
    manifest = read_manifest(folder)
    assert manifest["tokenizer"]["eot"] == EOT and manifest["source"]["name"] == "sample"
    splits = {e["split"] for e in manifest["shards"]}
    assert splits == {"train", "val"}
    for e in manifest["shards"]:
        path = folder / e["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
        assert len(read_shard(path)) == e["tokens"] and len(read_doc_starts(path)) == e["documents"]
    train_tokens = sum(e["tokens"] for e in manifest["shards"] if e["split"] == "train")
    assert 400_000 < train_tokens < 1_000_000


def test_validation_split_is_stable_and_disjoint(sample_docs):
    ids = [i for i, _ in sample_docs]
    val = {i for i in ids if is_validation(i, 0.05)}
    assert 0 < len(val) < 0.15 * len(ids)
    assert val == {i for i in reversed(ids) if is_validation(i, 0.05)}  # order does not matter
    assert val <= {i for i in ids if is_validation(i, 0.10)}  # growing the fraction only adds documents


@pytest.fixture(scope="module")
def windows(data_dir):
    return TokenWindows(data_dir / "sample", "train", seq_len=32)


def test_targets_are_inputs_shifted_by_one(windows):
    x, y = SequentialBatches(windows, batch_size=4)[0]
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = torch.from_numpy(windows.shards[0][: 4 * 32 + 1].astype(np.int64))
    assert torch.equal(x.reshape(-1), stream[:-1]) and torch.equal(y[-1], stream[-32:])


def test_ranks_read_disjoint_batches_that_cover_the_single_process_epoch(windows):
    one = SequentialBatches(windows, batch_size=4)
    ranks = [SequentialBatches(windows, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    n = len(ranks[0])
    union = torch.cat([ranks[r][i][0] for i in range(n) for r in (0, 1)])
    assert torch.equal(union, torch.cat([one[i][0] for i in range(2 * n)]))


def test_epochs_wrap_around(windows):
    batches = SequentialBatches(windows, batch_size=4)
    assert torch.equal(batches[len(batches)][0], batches[0][0])


@pytest.mark.parametrize("num_windows, world_size", [(10, 2), (7, 2), (5, 4)])
def test_validation_windows_split_across_ranks(data_dir, num_windows, world_size):
    """The ranks' real (weight 1) windows are the single process's, each once, with their sources; every rank gets
    the same number of batches (padding with weight 0), so that FSDP's per-forward collectives line up."""
    val = TokenWindows(data_dir / "sample", "val", seq_len=32)
    train = TokenWindows(data_dir / "sample", "train", seq_len=32)  # a second source
    sources = [val, train]

    def rows(batches):
        return sorted((s, *x) for b in batches if b[2] == 1 for x, s in zip(b[0].tolist(), b[3].tolist()))

    single = list(ValidationBatches(sources, num_windows, batch_size=3))
    ranks = [list(ValidationBatches(sources, num_windows, 3, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    assert rows(b for batches in ranks for b in batches) == rows(single)
    expected = [(k, *x) for k, w in enumerate(sources) for x in w.get(np.arange(num_windows))[0].tolist()]
    assert rows(single) == sorted(expected)


def test_range_sampler_resumes_mid_run():
    assert list(RangeSampler(3, 7)) == [3, 4, 5, 6] and len(RangeSampler(3, 7)) == 7  # the whole epoch
    assert json.dumps(list(RangeSampler(5, 5))) == "[]"


@pytest.fixture
def prepared_copy(data_dir, tmp_path):
    folder = tmp_path / "sample"
    shutil.copytree(data_dir / "sample", folder)
    return folder


def check(folder, verify=True):
    return check_dataset(folder, RANKS_SHA256, verify_checksums=verify)


def test_a_sound_dataset_passes_its_check(prepared_copy):
    assert check(prepared_copy)["shards"]


def test_missing_dataset_is_refused(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json; prepare the dataset first"):
        check(tmp_path / "nothing_here")


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "header promises"),
        ("alter", "sha256 differs"),
        ("delete", "listed in manifest.json but missing"),
        ("tokenizer", "tokenized with ranks sha256"),
        ("no_val", "lists no val tokens"),
        ("bad_json", "not valid JSON"),
    ],
)
def test_damaged_dataset_is_refused(prepared_copy, damage, message):
    shard = prepared_copy / "train_000000.bin"
    manifest_path = prepared_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif damage == "alter":
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "delete":
        shard.unlink()
    elif damage == "tokenizer":
        manifest["tokenizer"]["ranks_sha256"] = "0" * 64
    elif damage == "no_val":
        manifest["shards"] = [e for e in manifest["shards"] if e["split"] != "val"]
    if damage in ("tokenizer", "no_val"):
        manifest_path.write_text(json.dumps(manifest))
    if damage == "bad_json":
        manifest_path.write_text("{not json")
    with pytest.raises(ShardError, match=message):
        check(prepared_copy)


def test_checksums_can_be_skipped_but_sizes_are_always_checked(prepared_copy):
    shard = prepared_copy / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    check(prepared_copy, verify=False)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match="header promises"):
        check(prepared_copy, verify=False)


def test_training_on_an_unprepared_dataset_names_the_prepare_command(tmp_path):
    from gptlab.config import load_config
    from gptlab.data.datamodule import TokenDataModule
    from tests.conftest import compose_train

    cfg, plan = load_config(compose_train(["data=fineweb_edu"], data_dir=tmp_path))
    with pytest.raises(ShardError) as err:
        TokenDataModule(cfg.data, cfg.eval, plan, seed=0).prepare_data()
    command = (
        f"python scripts/prepare_data.py data=fineweb_edu data.source=HuggingFaceFW/fineweb-edu "
        f"data.dir={tmp_path}/fineweb_edu_sample-10BT data.hub_config=sample-10BT"
    )
    assert command in str(err.value)
