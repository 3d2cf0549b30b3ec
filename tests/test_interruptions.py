"""Runs that survive kills and preemption, and never clobber another run (gptlab.resume, callbacks/preemption.py,
gptlab.run_folder, gptlab.locks). The processes' own behaviour is tested on scripts/train.py, in the slow tier."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.config import ConfigError, load_config
from gptlab.errors import DataError
from gptlab.locks import FolderInUse, FolderLock
from gptlab.resume import find_resume, newest_checkpoint
from gptlab.train import run
from tests.conftest import ROOT, compose_train, read_metrics

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "eval.hellaswag.enabled=false", "logger=none"]
# 12 steps of 2 micro-batches; a checkpoint every 2 steps, validation every 3: kills land between and on both.
RUN = ["debug=smoke", *TINY, "max_tokens=6144", "callbacks.checkpoint.every_n_steps=2", "eval.every_n_steps=3",
       "model.embd_dropout=0.1", "model.resid_dropout=0.1"]  # fmt: skip  (dropout: the RNG must resume too)
STEPS = 12
TIMING = ("tokens_per_s", "samples_per_s", "step_time_ms", "mfu")  # measured, so never equal between runs


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *overrides]


def script_env(data_dir: Path, **extra) -> dict:
    return {**os.environ, "GPTLAB_DATA_DIR": str(data_dir), "WANDB_MODE": "disabled", **extra}


def lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir)]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    whole = path.read_text().splitlines(keepends=True) if path.exists() else []
    return max([json.loads(line)["step"] for line in whole if line.endswith("\n")] or [0])


def start_and_signal(cmd: list[str], env: dict, run_dir: Path, at_step: int, signum: int) -> subprocess.Popen:
    """Start `cmd`; send `signum` once metrics.jsonl has reached `at_step`; return the finished process."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while steps_logged(run_dir) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"ended before step {at_step}: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signum)
    proc.out, proc.err = proc.communicate(timeout=300)
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = subprocess.run(train_command(run_dir), env=script_env(data_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


# --- exact resume under repeated kills ---------------------------------------------------------------------


@pytest.mark.slow
def test_three_sigkills_then_auto_resume_equal_an_uninterrupted_run_bitwise(tmp_path, data_dir, uninterrupted):
    """SIGKILL at steps 3, 7 and 10 (on and between checkpoints and validations), each time rerunning the same
    command with ckpt_path=auto: every metrics.jsonl line and the final weights equal the uninterrupted run's."""
    run_dir, env = tmp_path / "run", script_env(data_dir)
    cmd = train_command(run_dir, "ckpt_path=auto")
    for at_step in (3, 7, 10):
        killed = start_and_signal(cmd, env, run_dir, at_step, signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume     from" in done.stdout  # the header says where it started
    assert lines(run_dir) == lines(uninterrupted)
    assert all(torch.equal(v, weights(uninterrupted)[k]) for k, v in weights(run_dir).items())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == STEPS


# --- preemption -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_the_same_command_finishes_like_an_uninterrupted_run(
    tmp_path, data_dir, uninterrupted
):
    run_dir, env = tmp_path / "run", script_env(data_dir)
    cmd = train_command(run_dir, "ckpt_path=auto")  # the line a requeued job runs, every time
    preempted = start_and_signal(cmd, env, run_dir, 5, signal.SIGTERM)
    assert preempted.returncode == 128 + signal.SIGTERM, preempted.err[-3000:]
    assert "resume     ckpt_path=auto: no checkpoint in" in preempted.out  # the first time: a fresh start
    assert "Traceback" not in preempted.err
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["step"]
    assert summary["status"] == "preempted" and stopped_at >= 5 and summary["train_loss"] is not None
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == stopped_at  # the step it stopped at, not the last periodic one
    assert steps_logged(run_dir) == stopped_at  # nothing of the next step ran

    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(step {stopped_at})" in done.stdout
    assert lines(run_dir) == lines(uninterrupted)
    assert all(torch.equal(v, weights(uninterrupted)[k]) for k, v in weights(run_dir).items())


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_and_requeues_the_job(tmp_path, data_dir):
    """#SBATCH --signal=USR1@120: the same stop, then `scontrol requeue <job>` (a stand-in scontrol records it)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = script_env(data_dir, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    run_dir = tmp_path / "run"
    stopped = start_and_signal(train_command(run_dir), env, run_dir, 2, signal.SIGUSR1)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    assert calls.read_text() == "requeue 4242\n"
    assert not list(run_dir.rglob("hpc_ckpt*"))  # Lightning's own SLURM handler did not run


@pytest.mark.slow
def test_ctrl_c_is_recorded_as_interrupted(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    stopped = start_and_signal(train_command(run_dir), script_env(data_dir), run_dir, 2, signal.SIGINT)
    assert stopped.returncode == 130
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


# --- one run per folder -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_a_training_folder_fails_at_once_and_a_killed_runs_lock_is_taken_over(
    tmp_path, data_dir
):
    run_dir, env = tmp_path / "run", script_env(data_dir)
    first = subprocess.Popen(train_command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while steps_logged(run_dir) < 1 and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run(train_command(run_dir), env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"Folder in use: {run_dir} is in use: training by pid {first.pid} on ")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (run_dir / ".gptlab.lock").exists()  # left behind by the killed run: its flock went with it
    resumed = subprocess.run(train_command(run_dir, "ckpt_path=auto"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / ".gptlab.lock").exists()


@pytest.mark.slow
def test_a_failed_resume_of_a_completed_run_leaves_its_folder_byte_for_byte(tmp_path, data_dir, uninterrupted):
    """A config mistake while resuming in place: one line; summary.json, .hydra/, train.log, all as they were."""
    run_dir, env = tmp_path / "run", script_env(data_dir)
    subprocess.run(["cp", "-r", str(uninterrupted), str(run_dir)], check=True)
    before = snapshot(run_dir)
    for mistake in ("optimizer.lr=-1", "optimizer.lr=1e-4"):  # refused by the config check, by the resume check
        done = subprocess.run(train_command(run_dir, f"ckpt_path={run_dir}", mistake), env=env,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and done.stderr.strip().startswith("Config error:"), done.stderr[-2000:]
        assert snapshot(run_dir) == before, mistake
    fresh = subprocess.run(train_command(run_dir), env=env, capture_output=True, text=True)
    assert fresh.returncode == 2 and "holds another run's results" in fresh.stderr
    assert snapshot(run_dir) == before


def test_a_fresh_run_into_a_run_folder_is_refused_unless_overwrite(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    short = [*RUN, "max_tokens=512"]
    run(compose_train(short, run_dir, data_dir))
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="hydra.run.dir: .* holds another run's results .* overwrite=true"):
        run(compose_train(short, run_dir, data_dir))
    assert snapshot(run_dir) == before
    summary = run(compose_train([*short, "overwrite=true", "seed=7"], run_dir, data_dir))
    assert summary["status"] == "completed" and summary["seed"] == 7
    assert len(read_metrics(run_dir)) == len(before["metrics.jsonl"].splitlines())  # one history, the new run's


def test_the_lock_names_its_holder_and_is_free_again_after_release(tmp_path):
    with FolderLock(tmp_path / "f", "preparing sample"):
        with pytest.raises(FolderInUse, match=f"in use: preparing sample by pid {os.getpid()} on "):
            FolderLock(tmp_path / "f", "training").acquire()
    FolderLock(tmp_path / "f", "training").acquire().release()
    assert list((tmp_path / "f").iterdir()) == []  # the lock file goes with the lock


# --- which checkpoint, and whether this config may continue it --------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_dir) -> Path:
    """3 steps, checkpoints at 2 and 3 (last)."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    run(compose_train([*RUN, "max_tokens=1536"], run_dir, data_dir))
    return run_dir


def resume_config(run_dir: Path, *overrides: str):
    return load_config(compose_train([*RUN, "max_tokens=3072", f"ckpt_path={run_dir}", *overrides]))[0]


def test_the_newest_whole_checkpoint_is_resumed(short_run, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    subprocess.run(["cp", "-r", str(short_run), str(tmp_path / "run")], check=True)
    assert newest_checkpoint(folder)[0] == folder / "last.ckpt"
    (folder / "last.ckpt").unlink()  # killed while last.ckpt was first written: the step file is whole
    assert find_resume(resume_config(tmp_path / "run"), tmp_path).path == str(folder / "step_000002.ckpt")
    (folder / "last.ckpt").write_bytes((folder / "step_000002.ckpt").read_bytes()[:1000])  # damaged
    resume = find_resume(resume_config(tmp_path / "run"), tmp_path)
    assert resume.path == str(folder / "step_000002.ckpt") and "last.ckpt is truncated" in resume.note
    (folder / "step_000002.ckpt").write_bytes(b"")
    with pytest.raises(DataError, match="no checkpoint in .* reads: .*last.ckpt is truncated.*000002.ckpt is empty"):
        find_resume(resume_config(tmp_path / "run"), tmp_path)


def test_ckpt_path_auto_starts_fresh_where_there_is_no_checkpoint(tmp_path):
    cfg, _ = load_config(compose_train([*RUN, "ckpt_path=auto"]))
    resume = find_resume(cfg, tmp_path / "new")
    assert resume.path is None and "no checkpoint in" in resume.note and "starting fresh" in resume.note


@pytest.mark.parametrize(
    "override, key",
    [("optimizer.lr=1e-4", "optimizer.lr"), ("scheduler=wsd", "scheduler.name"), ("grad_clip=0.5", "grad_clip"),
     ("global_batch_tokens=1024", "global_batch_tokens"), ("model.n_layer=3", "model.n_layer"), ("seed=1", "seed"),
     ("precision=bf16", "precision.name"), ("data.seq_len=32", "data.seq_len")],
)  # fmt: skip
def test_resuming_with_a_different_optimization_names_the_key_and_both_values(short_run, override, key):
    cfg = resume_config(short_run, override)
    with pytest.raises(ConfigError) as error:
        find_resume(cfg, short_run)
    assert error.value.key == key and "the checkpoint" in error.value.message and f"set {key}=" in error.value.message


def test_resuming_may_change_the_budget_evaluation_logging_and_runtime(short_run):
    changes = ["max_tokens=4096", "eval.every_n_steps=1", "callbacks.checkpoint.every_n_steps=1", "logger=wandb",
               "trainer.log_every_n_steps=2", "model.compile=true", "data.num_workers=1", "tags=[again]"]  # fmt: skip
    resume = find_resume(resume_config(short_run, *changes), short_run)
    assert resume.step == 3 and resume.path == str(short_run / "checkpoints" / "last.ckpt")
