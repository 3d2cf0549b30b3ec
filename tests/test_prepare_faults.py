"""A prepare under faults (issue 19): SIGTERM, two prepares into one folder, a folder holding another dataset, a
source with nothing usable, damaged token ids, and "prepare it first" commands that must run as printed."""

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from gptlab.config import load_config, load_data_config
from gptlab.data.config import DataConfig, FilterConfig, PrepareConfig
from gptlab.data.datamodule import TokenDataModule, prepare_when_free
from gptlab.data.prepare import STATE, prepare_dataset
from gptlab.data.shards import MANIFEST, ShardError, check_dataset, read_manifest, write_shard
from gptlab.data.tokenizer import EOT, RANKS_SHA256
from gptlab.errors import DataError
from gptlab.locks import LOCK_FILE, FolderInUse, FolderLock
from tests.conftest import ROOT, compose_root, compose_train

TOPICS = [text for _, text in sorted(topics.items())]


def jsonl(path: Path, n: int, first: int = 0, field: str = "text") -> Path:
    """n documents of real English (pydoc's help topics), one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = [TOPICS[i % len(TOPICS)][:2000] for i in range(first, first + n)]
    path.write_text("".join(json.dumps({field: doc}) + "\n" for doc in docs))
    return path


def local(source, folder, val_fraction=0.3, **prepare) -> DataConfig:
    settings = {"workers": 1, "shard_tokens": 2000} | prepare
    return DataConfig(name="local", source=str(source), dir=str(folder), val_fraction=val_fraction, id_field=None,
                      prepare=PrepareConfig(**settings))  # fmt: skip


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- one prepare at a time per folder


def test_a_prepare_into_a_folder_another_process_is_preparing_fails_at_once_naming_it(tmp_path):
    source = jsonl(tmp_path / "docs.jsonl", 40)
    with FolderLock(tmp_path / "out", "preparing local"):  # another open file: flock treats it as another process
        with pytest.raises(FolderInUse, match=f"out is in use: preparing local by pid {os.getpid()} on "):
            prepare_dataset(local(source, tmp_path / "out"))
        assert [p.name for p in (tmp_path / "out").iterdir()] == [LOCK_FILE]  # nothing written
    prepare_dataset(local(source, tmp_path / "out"))
    assert (tmp_path / "out" / MANIFEST).is_file() and not (tmp_path / "out" / LOCK_FILE).exists()


def test_training_waits_for_the_job_preparing_a_built_in_corpus(tmp_path, data_dir):
    """The jobs of a parallel sweep all find the corpus unprepared: one prepares it, the others wait, then use it."""
    folder = tmp_path / "sample_code"
    cfg = DataConfig(name="sample_code", source="stdlib", dir=str(folder), val_fraction=0.05)
    lock = FolderLock(folder, "preparing sample_code").acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(prepare_when_free(cfg, poll_s=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got
    for f in (data_dir / "sample_code").iterdir():  # what the other job writes
        shutil.copy(f, folder / f.name)
    lock.release()
    waiter.join(timeout=30)
    assert got == [read_manifest(data_dir / "sample_code")]


# ---- a folder holding another dataset


@pytest.mark.parametrize(
    "change,key,there,here",
    [
        ({"shard_tokens": 500}, "data.prepare.shard_tokens", "2000", "500"),
        ({"val_fraction": 0.5}, "data.val_fraction", "0.3", "0.5"),
        ({"max_docs": 10}, "data.prepare.max_docs", "None", "10"),
        ({"filters": [FilterConfig(field="text", one_of=["x"])]}, "data.prepare.filters", "[]", '[{"field": "text"'),
        ({"source": "other.jsonl"}, "data.source", "{tmp}/docs.jsonl", "{tmp}/other.jsonl"),
        ({"text_field": "content"}, "data.text_field", "text", "content"),
    ],
)
def test_a_folder_holding_another_dataset_is_refused_naming_the_first_difference(tmp_path, change, key, there, here):
    source = jsonl(tmp_path / "docs.jsonl", 40)
    jsonl(tmp_path / "other.jsonl", 40, first=40, field="content" if "text_field" in change else "text")
    cfg = local(source, tmp_path / "out")
    manifest = prepare_dataset(cfg)
    before = folder_bytes(tmp_path / "out")
    assert prepare_dataset(cfg) == manifest  # the same settings: already prepared
    data = {k: v for k, v in change.items() if k in ("val_fraction", "source", "text_field")}
    if "source" in data:
        data["source"] = str(tmp_path / data["source"])
    prepare = dataclasses.replace(cfg.prepare, **{k: v for k, v in change.items() if k not in data})
    other = dataclasses.replace(cfg, prepare=prepare, **data)
    with pytest.raises(DataError) as err:
        prepare_dataset(other)
    message = str(err.value)
    there, here = there.replace("{tmp}", str(tmp_path)), here.replace("{tmp}", str(tmp_path))
    assert "\n" not in message and f"holds a dataset of another source or other settings ({key}: {there}" in message
    assert f" there, {here}" in message and "set data.dir to another folder, or delete" in message
    assert folder_bytes(tmp_path / "out") == before


def test_an_unfinished_prepare_with_other_settings_is_refused_naming_the_difference(tmp_path, monkeypatch):
    from gptlab.data import prepare

    source = jsonl(tmp_path / "docs.jsonl", 60)
    write_shard = prepare.write_shard

    def one_shard_then_crash(path, *args):
        if (tmp_path / "out" / STATE).exists():
            raise KeyboardInterrupt
        return write_shard(path, *args)

    monkeypatch.setattr(prepare, "write_shard", one_shard_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(local(source, tmp_path / "out"))
    monkeypatch.undo()
    other = r"unfinished prepare of another source or other settings \(data.prepare.shard_tokens: 2000 there, 1000 "
    with pytest.raises(DataError, match=other):
        prepare_dataset(local(source, tmp_path / "out", shard_tokens=1000))
    assert prepare_dataset(local(source, tmp_path / "out"))["prepare"]["shard_tokens"] == 2000  # its own resumes


def test_what_does_not_change_the_shards_does_not_refuse_a_prepared_folder(tmp_path):
    """A val_fraction unused (data.val_source set), tokenizer processes, and a source gone since: already prepared."""
    train, val = jsonl(tmp_path / "train.jsonl", 30), jsonl(tmp_path / "val.jsonl", 10, first=30)
    cfg = dataclasses.replace(local(train, tmp_path / "out"), val_source=str(val))
    manifest = prepare_dataset(cfg)
    unused = dataclasses.replace(cfg, val_fraction=0.01, prepare=PrepareConfig(workers=2, shard_tokens=2000))
    assert prepare_dataset(unused) == manifest
    train.unlink()
    assert prepare_dataset(cfg) == manifest


def test_the_script_says_already_prepared_or_refuses(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = local(jsonl(tmp_path / "docs.jsonl", 40), tmp_path / "out")
    script.prepare_folder(cfg)
    script.prepare_folder(cfg)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"{cfg.dir} is already prepared (from {cfg.source}); delete it to prepare it again"
    with pytest.raises(DataError, match=r"\(data.prepare.shard_tokens: 2000 there, 999 in this prepare\)"):
        script.prepare_folder(local(cfg.source, cfg.dir, shard_tokens=999))


# ---- nothing usable: an error, and no dataset left behind


def test_a_source_with_no_text_is_an_error_that_leaves_no_dataset(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_text(" \n\t")
    nothing = rf"^{re.escape(str(empty))}: no documents with text \(of 3: 3 empty\); nothing was prepared$"
    with pytest.raises(DataError, match=nothing):
        prepare_dataset(local(empty, tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
    source = jsonl(tmp_path / "docs.jsonl", 20)
    everything_filtered = local(source, tmp_path / "out", filters=[FilterConfig(field="text", one_of=["x"])])
    with pytest.raises(DataError, match=r"no documents with text \(of 20: 20 filtered out by data.prepare.filters\)"):
        prepare_dataset(everything_filtered)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_empty_validation_split_is_an_error_naming_a_val_fraction_that_works(tmp_path):
    source = tmp_path / "two"
    for i in range(2):
        jsonl(source / f"{i}.jsonl", 1, first=i)
    with pytest.raises(DataError) as err:
        prepare_dataset(local(source, tmp_path / "out", val_fraction=0.001))
    message = str(err.value)
    assert message.startswith("the validation split is empty: data.val_fraction=0.001 held out 0 of the 2 documents")
    assert not any(p.name.endswith((".bin", ".json")) for p in (tmp_path / "out").iterdir())  # no shard, no state
    fraction = float(message.split("set data.val_fraction=")[1].split()[0])
    manifest = prepare_dataset(local(source, tmp_path / "out", val_fraction=fraction))  # the fix it names works
    assert manifest["documents"]["train"]["kept"] == manifest["documents"]["val"]["kept"] == 1
    with pytest.raises(DataError, match="the training split is empty: data.val_fraction=0.999 held out 1 of the 1 "):
        prepare_dataset(local(source / "0.jsonl", tmp_path / "one", val_fraction=0.999))


# ---- token ids past the vocabulary, with checksums off


def test_ids_outside_the_vocabulary_fail_before_training_with_checksums_off(tmp_path, data_dir):
    shutil.copytree(data_dir / "sample", tmp_path / "sample")
    shard = tmp_path / "sample" / "train_000000.bin"
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+", offset=1024)
    tokens[12345] = 60000
    tokens.flush()
    cfg, plan = load_config(compose_train(["data.verify_checksums=false"], data_dir=tmp_path))
    with pytest.raises(ShardError) as err:
        TokenDataModule(cfg.data, cfg.eval, plan, seed=0).prepare_data()
    assert str(err.value) == (
        f"{shard}: token 12,345 is id 60000, outside the vocabulary of 50257 GPT-2 ids: the shard is damaged or not "
        "GPT-2 tokens (data.verify_checksums=true checks it against manifest.json)"
    )
    with pytest.raises(ShardError, match="sha256 differs"):  # checksums on: the checksum finds it
        check_dataset(tmp_path / "sample", RANKS_SHA256, verify_checksums=True)


def test_ids_outside_the_vocabulary_in_indexed_llmc_shards_fail_with_checksums_off(tmp_path):
    shards = tmp_path / "llmc"
    rng = np.random.default_rng(0)
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin"):
        ids = rng.integers(0, EOT, size=3000)
        ids[::100] = EOT
        write_shard(shards / name, ids, np.array([0]))
    prepare_dataset(DataConfig(name="local", source=str(shards), dir=str(tmp_path / "index"), prepare=PrepareConfig(1)))
    check_dataset(tmp_path / "index", RANKS_SHA256, verify_checksums=False)
    tokens = np.memmap(shards / "fineweb_train_000001.bin", dtype=np.uint16, mode="r+", offset=1024)
    tokens[2999] = 50257
    tokens.flush()
    with pytest.raises(ShardError, match=r"fineweb_train_000001.bin: token 2,999 is id 50257, outside the vocabulary "
                                         "of 50257 GPT-2 ids"):  # fmt: skip
        check_dataset(tmp_path / "index", RANKS_SHA256, verify_checksums=False)


# ---- the prepare command training prints


def test_the_printed_prepare_command_prepares_the_folder_the_run_expects(tmp_path, monkeypatch):
    """Run from another folder with relative paths and non-default settings: the command, run from the repository,
    prepares the very folder the run reads, with the run's settings."""
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "docs" / "train.jsonl", 30, field="content")
    overrides = [
        "data=local", "data.source=docs/train.jsonl", "data.dir=prepared/y", "data.val_fraction=0.2",
        "data.text_field=content", "data.prepare.shard_tokens=3000", "data.prepare.max_docs=20",
    ]  # fmt: skip
    cfg, plan = load_config(compose_train(overrides))
    module = TokenDataModule(cfg.data, cfg.eval, plan, seed=0)
    with pytest.raises(ShardError, match="Prepare it first") as err:
        module.prepare_data()
    words = shlex.split(str(err.value).splitlines()[-1])
    assert words[:2] == ["python", "scripts/prepare_data.py"]
    monkeypatch.chdir(ROOT)  # where the command runs
    prepared = load_data_config(compose_root("prepare", words[2:]))
    prepare_dataset(prepared)
    monkeypatch.chdir(tmp_path)
    module.prepare_data()  # the run finds its folder prepared
    manifest = read_manifest(tmp_path / "prepared" / "y")
    assert (manifest["val_fraction"], manifest["source"]["text_field"]) == (0.2, "content")
    assert manifest["prepare"]["shard_tokens"] == 3000 and manifest["documents"]["train"]["kept"] == 20


# ---- the entry point, killed or raced (subprocesses)


def big_source(path: Path, megabytes: int) -> Path:
    """Documents of ~20 kB (~5k tokens, a quarter of a shard): ~250k tokens per MB, ~1 s of tokenizing for 12 MB."""
    body = "\n\n".join(TOPICS)
    docs = [body[i * 997 % len(body) :][:20_000] for i in range(megabytes * 50)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def prepare_args(source: Path, folder: Path, workers: int, shard_tokens: int = 20000) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "data=local", f"data.source={source}",
            f"data.dir={folder}", "data.val_fraction=0.2", f"data.prepare.shard_tokens={shard_tokens}",
            f"data.prepare.workers={workers}"]  # fmt: skip


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, GPTLAB_ROOT=str(ROOT))
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen) -> None:
    while not condition() and proc.poll() is None:
        time.sleep(0.005)
    assert condition(), proc.communicate()[1][-3000:]


@pytest.mark.slow
def test_sigterm_stops_a_prepare_like_ctrl_c_and_the_same_command_resumes_it(tmp_path):
    source, out = big_source(tmp_path / "docs.jsonl", 12), tmp_path / "out"
    args = prepare_args(source, out, workers=2)
    proc = start(args)
    wait_for(lambda: (out / STATE).exists(), proc)  # a shard finished and its progress saved
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)  # returns once the workers, which share stderr, are gone too
    assert proc.returncode == 143 and "Traceback" not in err and "Error" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last == "Terminated: run the same command again to resume after the last finished shard"
    assert (out / STATE).is_file() and not (out / MANIFEST).exists()

    env = dict(os.environ, GPTLAB_ROOT=str(ROOT))
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0 and "Resuming an interrupted prepare" in resumed.stderr, resumed.stderr[-3000:]
    whole = prepare_dataset(local(source, tmp_path / "whole", val_fraction=0.2, shard_tokens=20000))
    assert read_manifest(out)["shards"] == whole["shards"]


@pytest.mark.slow
def test_a_second_prepare_into_a_folder_being_prepared_fails_at_once_naming_the_first(tmp_path):
    source, out = big_source(tmp_path / "docs.jsonl", 2), tmp_path / "out"
    first = start(prepare_args(source, out, workers=1))

    def held() -> bool:
        try:
            return json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        except (OSError, ValueError):
            return False

    try:
        wait_for(held, first)
        first.send_signal(signal.SIGSTOP)  # it holds the lock for as long as the second one takes
        second = subprocess.run(prepare_args(source, out, workers=1, shard_tokens=5000), capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, GPTLAB_ROOT=str(ROOT)))  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"Folder in use: {out} is in use: preparing local by pid {first.pid} on ")
    assert "data.prepare.shard_tokens=20000" in line  # the holder's command
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert check_dataset(out, RANKS_SHA256, verify_checksums=True)["prepare"]["shard_tokens"] == 20000
