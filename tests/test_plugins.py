"""Hydra plugins: Optuna `hparams_search=` presets, the joblib launcher, submitit (local runs, SLURM scripts).

The plugins are optional dependencies: each test skips when its plugin is missing. The sweeps run the real
entry point in a subprocess on debug=smoke (2 steps), a few seconds per job plus ~8 s of imports.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gptlab.config import load_config

from .conftest import CONF, ROOT, compose_train

PRESETS = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
SEARCH = "hparams_search"  # a group of train.yaml's defaults (null), so `hparams_search=<name>` selects a preset


def _sweep(args: list[str], sweep_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "debug=smoke", "logger=none",
           f"paths.data_dir={data_dir}", f"hydra.sweep.dir={sweep_dir}", *args]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=sweep_dir.parent)


def _summaries(sweep_dir: Path) -> list[dict]:
    """Every job's summary.json, with its job folder (relative to the sweep) under "folder"."""
    paths = sorted(sweep_dir.rglob("summary.json"))
    return [json.loads(p.read_text()) | {"folder": str(p.parent.relative_to(sweep_dir))} for p in paths]


def _compose_hydra(overrides: list[str]):
    """The full config, Hydra's own node included (what the sweeper and launcher are built from)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_hparams_search_preset_is_an_optuna_minimization_of_valid_configs(preset):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = _compose_hydra([f"{SEARCH}={preset}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler.seed is not None  # the same sweep proposes the same trials
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert space and not fixed and "optimizer.lr" in space
    assert space["optimizer.lr"].__class__.__name__ == "LogUniformDistribution"
    # every searched key exists in the job's config, and the job config passes gptlab's checks
    job_cfg = compose_train([f"{SEARCH}={preset}"])
    for key in space:
        assert OmegaConf.select(job_cfg, key) is not None, key
    load_config(job_cfg)


@pytest.mark.slow
def test_optuna_sweep_returns_val_loss_and_survives_a_failed_trial(tmp_path, data_dir):
    """The adamw preset's seeded TPE sampler over warmup {1, -1}: a negative warmup is a config error, so that
    trial fails and the study goes on; Optuna's best value is the best completed job's final val loss."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "optuna"
    space = ["optimizer.lr=1e-3", "optimizer.weight_decay=0.1", "scheduler.warmup_steps=choice(1,-1)"]
    proc = _sweep([f"{SEARCH}=adamw", "hydra.sweeper.n_trials=2", *space], sweep_dir, data_dir)

    summaries = _summaries(sweep_dir)
    failed = [s for s in summaries if s["status"] != "completed"]
    completed = [s for s in summaries if s["status"] == "completed"]
    assert len(summaries) == 2 and len(failed) == 1, proc.stderr[-3000:]  # the seeded sampler draws both values
    assert proc.returncode == 1 and "sweep: 1 of 2 jobs failed" in proc.stderr  # the exit status counts failures
    assert "scheduler.warmup_steps" in failed[0]["error"] and "warmup_steps=-1" in failed[0]["folder"]
    assert "warmup_steps=1" in completed[0]["folder"] and math.isfinite(completed[0]["val_loss"])

    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_params == {"scheduler.warmup_steps": 1}
    assert results.best_value == pytest.approx(completed[0]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "joblib"
    proc = _sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1"], sweep_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr

    summaries = _summaries(sweep_dir)
    assert [s["seed"] for s in summaries] == [0, 1] and {s["status"] for s in summaries} == {"completed"}
    assert len({s["folder"] for s in summaries}) == 2
    assert summaries[0]["val_loss"] != summaries[1]["val_loss"]  # different seeds, different runs


@pytest.mark.slow
def test_submitit_local_runs_a_job(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "submitit"
    proc = _sweep(["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"], sweep_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = _summaries(sweep_dir)
    assert summary["status"] == "completed" and math.isfinite(summary["val_loss"])
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # it really went through submitit


class _Captured(Exception):
    """Raised in place of calling sbatch."""


def test_slurm_preset_writes_one_task_per_gpu(tmp_path, monkeypatch):
    """The real launcher builds its sbatch script from our preset; capture the script instead of submitting it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.slurm.slurm import SlurmExecutor

    cfg = _compose_hydra(["hydra/launcher=slurm", "trainer.devices=4", "distributed.num_nodes=2",
                          "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}"])  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    scripts, make_text = [], SlurmExecutor._make_submission_file_text

    def capture(self, command, uid):
        scripts.append(make_text(self, command, uid))
        raise _Captured

    monkeypatch.setattr(SlurmExecutor, "_make_submission_file_text", capture)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # as if srun were installed
    with pytest.raises(_Captured):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)

    (script,) = scripts  # one array job for the whole sweep
    flags = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                 "--partition=gpu", "--time=2880", "--array=0-1%2"):  # fmt: skip (at most 64 at once, capped at the 2 jobs)
        assert flag in flags, (flag, flags)
