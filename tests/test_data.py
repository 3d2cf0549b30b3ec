"""Shard format (llm.c compatible), dataset preparation, the sample corpus and the sequential loader."""

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
    """The ranks' real (weight 1) windows are the single process's, each once; every rank gets the same number
    of batches (padding with weight 0), so that FSDP's per-forward collectives line up."""
    val = TokenWindows(data_dir / "sample", "val", seq_len=32)
    single = torch.cat([x for x, _, w in ValidationBatches(val, num_windows, batch_size=3) if w == 1])
    ranks = [list(ValidationBatches(val, num_windows, 3, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    real = torch.cat([x for batches in ranks for x, _, w in batches if w == 1])
    assert sorted(map(tuple, real.tolist())) == sorted(map(tuple, single.tolist()))


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
