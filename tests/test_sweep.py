"""Multirun sweeps: one folder per job, unique sweep folders, failures recorded and counted, and one offline
W&B run per job grouped by sweep (read back with wandb's own offline reader, `wandb leet inspect`)."""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra.core.utils
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from gptlab.config import load_config
from gptlab.sweep import job_statuses
from tests.conftest import CONF, ROOT, compose_train


def sweep(args: list[str], output_root: Path, data_dir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`python scripts/train.py -m debug=smoke <args>` into output_root/multiruns/<the one new sweep folder>."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "debug=smoke", *args]
    cmd += [f"paths.output_root={output_root}", f"paths.data_dir={data_dir}"]  # default, unique sweep dir
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=output_root)
    sweeps = list((output_root / "multiruns").iterdir())
    assert len(sweeps) == 1, (sweeps, proc.stderr[-3000:])  # all jobs share the sweep's (cached) uid
    return proc, sweeps[0]


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of the job's offline W&B run, decoded by wandb's own reader: no network, no API key."""
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(offline_run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, stdin=subprocess.DEVNULL)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory, data_dir) -> Path:
    """A 2x2 CPU sweep with W&B offline: learning rate x seed. Returns its sweep folder."""
    out = tmp_path_factory.mktemp("sweep_2x2")
    args = ["optimizer.lr=1e-3,3e-3", "seed=0,1", "logger=wandb", "tags=[ablation]"]
    proc, folder = sweep(args, out, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 0 of 4 jobs failed" in proc.stdout
    assert f"summary      python scripts/summarize_sweep.py {folder}" in proc.stdout  # how the sweep ends
    assert "gptlab: done" not in proc.stdout  # no per-job result block in a sweep
    return folder


@pytest.mark.slow
def test_2x2_sweep_gives_4_job_folders_and_4_wandb_runs_in_one_group(sweep_2x2):
    jobs = job_statuses(sweep_2x2)
    name = "debug=smoke,logger=wandb,optimizer.lr={},tags=[ablation]/seed={}"  # sorted overrides, the seed apart
    assert jobs == {name.format(lr, seed): "completed" for lr in ("0.001", "0.003") for seed in (0, 1)}
    runs = {}
    for job in jobs:
        records = wandb_records(sweep_2x2 / job)
        (run,) = [r["run"] for r in records if r["type"] == "run"]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        exit_codes = [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"]
        assert run["run_group"] == sweep_2x2.name and run["job_type"] == "train" and run["tags"] == ["ablation"]
        assert set(job.split("/")[0].split(",")) <= set(run["display_name"].split(","))  # named by its overrides
        summary = json.loads((sweep_2x2 / job / "summary.json").read_text())
        assert any(h.get("val/loss") == pytest.approx(summary["val_loss"]) for h in history)
        assert exit_codes == [0]  # finished (wandb.finish per job), so `wandb sync` uploads a complete run
        runs[run["run_id"]] = job
    assert len(runs) == 4  # four runs, none merged into another


@pytest.mark.slow
def test_summarize_sweep_tables_the_2x2_sweep_and_pairs_its_seeds(sweep_2x2, tmp_path, capsys):
    """scripts/summarize_sweep.py on the real sweep: 2 configs of 2 seeds, one row per job in jobs.csv, and the
    verdict of lr 0.003 against 0.001 paired by seed, as scipy computes it from the jobs' summary.json."""
    import csv
    import importlib.util

    from scipy import stats

    spec = importlib.util.spec_from_file_location("summarize_sweep", ROOT / "scripts" / "summarize_sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([str(sweep_2x2), "--out", str(tmp_path)])
    configs = list(csv.DictReader((tmp_path / "summary.csv").open()))
    jobs = list(csv.DictReader((tmp_path / "jobs.csv").open()))
    assert len(configs) == 2 and len(jobs) == 4
    assert [(c["optimizer.lr"], c["n_seeds"]) for c in configs] == [("0.001", "2"), ("0.003", "2")]
    losses = {}
    for job in jobs:
        summary = json.loads((sweep_2x2 / job["job"] / "summary.json").read_text())
        assert float(job["final_val_loss"]) == pytest.approx(summary["val_loss"])
        losses[job["optimizer.lr"], int(job["seed"])] = summary["val_loss"]
    printed = capsys.readouterr().out.splitlines()  # the per-config table: 2 rows of 2 seeds
    assert sum(re.fullmatch(r"\| optimizer\.lr=0\.00[13] \| 2 \| .*", line) is not None for line in printed) == 2
    (verdict,) = csv.DictReader((tmp_path / "verdicts.csv").open())
    base, treated = ([losses[lr, seed] for seed in (0, 1)] for lr in ("0.001", "0.003"))
    assert verdict["comparison"] == "optimizer.lr=0.003 vs 0.001" and verdict["n"] == "2"
    assert float(verdict["delta"]) == pytest.approx((treated[0] - base[0] + treated[1] - base[1]) / 2)
    assert float(verdict["p"]) == pytest.approx(stats.ttest_rel(treated, base).pvalue)


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_counted_while_the_others_complete(tmp_path, data_dir):
    """A bad value fails its jobs (at run time, in the task) but the sweep trains the rest, and its exit
    status counts the failures. The seed is swept too: it is left out of the config's folder name, each seed
    gets its own subfolder, and seed 0 is a seed like any other."""
    proc, folder = sweep(["logger=none", "optimizer.lr=-1,3e-3", "seed=0,1"], tmp_path, data_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    bad = ["debug=smoke,logger=none,optimizer.lr=-1/seed=0", "debug=smoke,logger=none,optimizer.lr=-1/seed=1"]
    assert f"sweep: 2 of 4 jobs failed: {bad[0]} (config_error), {bad[1]} (config_error)" in proc.stderr
    assert "Traceback" not in proc.stderr  # a config mistake is one line per job, as in a single run
    assert job_statuses(folder) == dict.fromkeys(bad, "config_error") | {
        "debug=smoke,logger=none,optimizer.lr=0.003/seed=0": "completed",
        "debug=smoke,logger=none,optimizer.lr=0.003/seed=1": "completed",
    }
    failed = json.loads((folder / bad[0] / "summary.json").read_text())
    assert failed["error"].startswith("Config error: optimizer.lr:") and failed["seed"] == 0
    good = folder / "debug=smoke,logger=none,optimizer.lr=0.003"
    done = [json.loads((good / f"seed={s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [d["seed"] for d in done] == [0, 1] and done[0]["val_loss"] != done[1]["val_loss"]


def compose_with_hydra(overrides: list[str] = ()):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


def test_two_sweeps_started_in_the_same_second_get_different_folders(tmp_path, monkeypatch):
    class Frozen(datetime.datetime):  # the clock of Hydra's `${now:...}` stopped: "the same second"
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 1)

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    dirs = [compose_with_hydra([f"paths.output_root={tmp_path}"]).hydra.sweep.dir for _ in range(2)]
    assert dirs[0] != dirs[1]
    assert all(Path(d).parent == tmp_path / "multiruns" for d in dirs)
    assert all(Path(d).name.startswith("2030-01-01_00-00-00_") for d in dirs)


def test_wandb_group_is_the_sweep_folder_and_tags_name_the_experiment(tmp_path, data_dir):
    """In-process: a multirun job's W&B group defaults to its sweep folder's name, logger.group wins, a single
    run has no group; tags are cfg.tags plus the experiment preset's name."""
    from gptlab.loggers import _wandb_group, _wandb_tags

    def hydra_job(mode: str):
        cfg = compose_with_hydra([f"hydra.sweep.dir={tmp_path}/my_sweep", f"hydra.mode={mode}"])
        with open_dict(cfg):
            cfg.hydra.runtime.choices.experiment = "ablate_warmup"  # as `experiment=ablate_warmup` would
        HydraConfig.instance().set_config(cfg)

    train_cfg, _ = load_config(compose_train(["tags=[a,b]"], tmp_path / "run", data_dir))
    grouped, _ = load_config(compose_train(["logger.group=mine"], tmp_path / "run", data_dir))
    try:
        hydra_job("RUN")
        assert _wandb_group(train_cfg) is None and _wandb_tags(train_cfg) == ["a", "b", "ablate_warmup"]
        hydra_job("MULTIRUN")
        assert _wandb_group(train_cfg) == "my_sweep" and _wandb_group(grouped) == "mine"
    finally:
        HydraConfig.instance().cfg = None


def test_only_rank_zero_logs(tmp_path, data_dir, monkeypatch):
    """On a rank other than 0 the W&B logger makes no run and no file (Lightning's rank_zero_experiment)."""
    from lightning.pytorch.utilities import rank_zero_only

    from gptlab.loggers import build_loggers

    cfg, _ = load_config(compose_train(["logger=wandb"], tmp_path / "run", data_dir))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    jsonl, wandb_logger = build_loggers(cfg, tmp_path / "run", run_name="rank1")
    jsonl.log_metrics({"val/loss": 1.0}, step=0)
    wandb_logger.log_metrics({"val/loss": 1.0}, step=0)
    assert "DummyExperiment" in type(wandb_logger.experiment).__name__
    assert not (tmp_path / "run").exists()  # no metrics.jsonl, no wandb/ folder, no run id
