"""Reproducibility: a seed (0 included) fixes the metrics bit for bit on CPU, the run folder records what the
run was made from, and a run re-run from its folder gives its metrics again."""

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptlab.callbacks.throughput import METRICS as THROUGHPUT_METRICS
from gptlab.pretrained import load_gpt
from gptlab.provenance import DIFF_FILE, PROVENANCE_FILE, config_differences, rerun_overrides, write_provenance
from gptlab.train import run
from tests.conftest import CONF, ROOT, compose_train

TIMING_KEYS = set(THROUGHPUT_METRICS)  # wall-clock measurements: the only logged values that differ between two runs
DROPOUT = ["model.embd_dropout=0.1", "model.attn_dropout=0.1", "model.resid_dropout=0.1"]  # draws from the RNG


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def weights(run_dir) -> dict:
    return load_gpt(run_dir / "checkpoints" / "last.ckpt").state_dict()


@pytest.mark.slow
def test_same_seed_gives_identical_runs_and_seed_zero_is_a_seed(tmp_path, data_dir, one_thread):
    """Init, data order and dropout all follow `seed`: seed 0 twice is bitwise the same run, seed 1 another;
    pinning data.shuffle_seed apart, or switching dropout off, changes the seed-0 run."""
    variants = {
        "a": ["seed=0", *DROPOUT], "b": ["seed=0", *DROPOUT], "seed1": ["seed=1", *DROPOUT],
        "order": ["seed=0", *DROPOUT, "data.shuffle_seed=1"], "no_dropout": ["seed=0"],
    }  # fmt: skip
    runs = {}
    for name, extra in variants.items():
        summary = run(compose_train(["debug=smoke", "logger=none", *extra], tmp_path / name, data_dir))
        assert summary["status"] == "completed" and summary["seed"] == (1 if name == "seed1" else 0)
        runs[name] = metrics(tmp_path / name), weights(tmp_path / name)
    (m_a, w_a), (m_b, w_b), (m_c, w_c) = runs["a"], runs["b"], runs["seed1"]
    assert any("train/loss" in m for m in m_a) and any("val/loss" in m for m in m_a)
    assert m_a == m_b  # exact float equality, every logged value of every step
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert [m.get("val/loss") for m in m_a] != [m.get("val/loss") for m in m_c]  # seed 0 is not seed 1 (or None)
    assert not torch.equal(w_a["transformer.wte.weight"], w_c["transformer.wte.weight"])

    def first_train_loss(name):
        return next(m["train/loss"] for m in runs[name][0] if "train/loss" in m)

    assert first_train_loss("order") != first_train_loss("a")  # other documents in the first batch
    assert first_train_loss("no_dropout") != first_train_loss("a")
    assert runs["order"][0][0] == m_a[0]  # same init: the same val/loss at step 0, before any batch


def test_run_folder_records_provenance(tmp_path, data_dir, one_thread):
    run_dir = tmp_path / "run"
    run(compose_train(["debug=smoke", "logger=none", "max_tokens=512"], run_dir, data_dir))
    record = json.loads((run_dir / PROVENANCE_FILE).read_text())
    assert record["argv"] == sys.argv and shlex.split(record["command"])[1:] == sys.argv
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["lightning"] and versions["hydra-core"] and versions["omegaconf"] and versions["numpy"]
    assert versions["cuda"] == torch.version.cuda and "platform" in versions
    head = _git(ROOT, "rev-parse", "HEAD")  # None where the code is not in a git checkout
    assert record["git"]["commit"] == head
    if head is not None:
        assert (run_dir / DIFF_FILE).is_file() == record["git"]["dirty"]


def _git(cwd, *args) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=_GIT_ENV)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


_GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}  # fmt: skip


def test_provenance_records_commit_dirty_tree_and_diff(tmp_path, monkeypatch):
    """In a scratch git repository: a clean tree has no diff; an edit makes it dirty and lands in git.diff."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")
    if _git(repo, "init", "-q") is None:
        pytest.skip("git is not installed")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    commit = _git(repo, "rev-parse", "HEAD")

    clean = write_provenance(tmp_path / "clean", argv=["train.py", "seed=0"], code_dir=repo / "pkg")
    assert clean["git"]["commit"] == commit and clean["git"]["dirty"] is False
    assert clean["command"].endswith("train.py seed=0") and not (tmp_path / "clean" / DIFF_FILE).exists()

    (repo / "pkg" / "code.py").write_text("x = 2\n")
    (repo / "new.py").write_text("")
    dirty = write_provenance(tmp_path / "dirty", argv=["train.py"], code_dir=repo / "pkg")
    assert dirty["git"]["commit"] == commit and dirty["git"]["dirty"] is True
    assert dirty["git"]["untracked"] == ["new.py"]  # relative to the repository root, not to code_dir
    diff = (tmp_path / "dirty" / DIFF_FILE).read_text()
    assert "-x = 1\n+x = 2\n" in diff and diff == _git_raw(repo, "diff", "HEAD")
    assert json.loads((tmp_path / "dirty" / PROVENANCE_FILE).read_text()) == dirty

    outside = write_provenance(tmp_path / "nogit", argv=[], code_dir=tmp_path / "clean")  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # git is not installed
    missing = write_provenance(tmp_path / "nogit2", argv=[], code_dir=repo)
    for record in (outside, missing):
        assert record["git"]["commit"] is None and "error" in record["git"]


def _git_raw(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=_GIT_ENV, check=True).stdout


def test_provenance_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delitem(sys.modules, "lightning.fabric.utilities.rank_zero", raising=False)  # read the environment
    assert write_provenance(tmp_path / "run") is None and not (tmp_path / "run").exists()


def test_rerun_overrides_and_config_differences(tmp_path):
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    saved = ["debug=smoke", "seed=0", "optimizer=sgd", "+tags=[a]"]
    OmegaConf.save(OmegaConf.create(saved), hydra_dir / "overrides.yaml")
    assert rerun_overrides(tmp_path) == saved
    assert rerun_overrides(tmp_path, ["seed=1", "optimizer=adamw", "max_tokens=512"]) == [
        "debug=smoke", "+tags=[a]", "seed=1", "optimizer=adamw", "max_tokens=512",
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="overrides.yaml"):
        rerun_overrides(tmp_path / "nothing")

    saved = {"seed": 0, "optimizer": {"lr": 3e-3, "betas": [0.9, 0.95]}, "old": 1}
    now = {"seed": 0, "optimizer": {"lr": 1e-3, "betas": [0.9, 0.95]}, "new": None}
    assert config_differences(saved, now) == [
        "new: '<absent>' in the run, None now", "old: 1 in the run, '<absent>' now",
        "optimizer.lr: 0.003 in the run, 0.001 now",
    ]  # fmt: skip
    assert config_differences(saved, saved) == []


@pytest.mark.slow
def test_rerun_from_a_run_folder_reproduces_its_metrics(tmp_path, data_dir, one_thread):
    """`python scripts/rerun.py <run folder>` as a user types it, on a run folder holding what Hydra writes
    (.hydra/config.yaml unresolved, .hydra/overrides.yaml); --strict: today's config must equal the saved one."""
    overrides = ["debug=smoke", "logger=none", "seed=0", f"paths.data_dir={data_dir}", *DROPOUT]
    original = tmp_path / "original"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=overrides)
    (original / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, original / ".hydra" / "config.yaml")  # unresolved, as Hydra saves it
    OmegaConf.save(OmegaConf.create(overrides), original / ".hydra" / "overrides.yaml")
    run(compose_train(overrides, original))

    again = tmp_path / "again"
    cmd = [sys.executable, str(ROOT / "scripts" / "rerun.py"), str(original), "--strict", f"hydra.run.dir={again}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "differs" not in proc.stderr
    assert metrics(again) == metrics(original) and len(metrics(again)) > 0
    assert OmegaConf.load(again / ".hydra" / "overrides.yaml") == OmegaConf.create(overrides)
    record = json.loads((again / PROVENANCE_FILE).read_text())
    assert record["argv"][0].endswith("train.py") and record["argv"][1:] == [*overrides, f"hydra.run.dir={again}"]
