"""scripts/summarize_sweep.py and gptlab.sweep_summary on a synthetic sweep folder with known metrics."""

import csv
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import yaml
from matplotlib.collections import PathCollection

from gptlab.sweep_summary import load_sweep, mean_curve, plot_vs_key
from tests.conftest import ROOT

# (lr, scheduler) -> per seed: (final val loss, an earlier, lower val loss or None, hellaswag acc_norm, tokens/s)
RESULTS = {
    ("1e-3", "cosine"): {0: (3.0, None, 0.25, 1000.0), 1: (3.2, 3.1, 0.26, 1100.0), 2: (3.4, None, 0.27, 1200.0)},
    ("3e-3", "wsd"): {0: (2.0, 1.5, None, 900.0), 1: (2.5, None, 0.30, 950.0), 2: (3.0, None, 0.32, 1000.0)},
}
COMMON = ["debug=smoke", "paths.data_dir=/data"]


def write_job(sweep: Path, num: int, lr: str, scheduler: str, seed: int, summary: dict | None, curve: list) -> Path:
    """A job folder as a Hydra multirun leaves it (folder name = overrides minus seed, plus the seed)."""
    folder = sweep / f"optimizer.lr={lr},scheduler={scheduler}" / f"seed={seed}"
    (folder / ".hydra").mkdir(parents=True)
    overrides = [*COMMON, f"optimizer.lr={lr}", f"scheduler={scheduler}", f"seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "optimizer": {"lr": float(lr)}}))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    lines = [json.dumps({"step": s, "val/loss": v}) for s, v in curve]
    lines.insert(1, json.dumps({"step": 1, "train/loss": 9.0, "tokens_per_s": 555.0}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def completed(final, acc_norm, tps, seed) -> dict:
    return {"status": "completed", "step": 20, "val_loss": final, "val_bpb": final / 3, "hellaswag_acc_norm": acc_norm,
            "tokens_per_s": tps, "seed": seed, "error": None}  # fmt: skip


@pytest.fixture
def sweep(tmp_path) -> Path:
    """2 configs x 3 completed seeds, plus a failed, a running and a stale (killed) job of the first config."""
    folder = tmp_path / "multiruns" / "2026-01-01_00-00-00_abc123"
    num = 0
    for (lr, scheduler), seeds in RESULTS.items():
        for seed, (final, lower, acc_norm, tps) in seeds.items():
            curve = [(0, 10.0 + seed), (10, lower or final + 0.5), (20, final)]
            write_job(folder, num, lr, scheduler, seed, completed(final, acc_norm, tps, seed), curve)
            num += 1
    failed = {"status": "diverged", "step": 10, "val_loss": None, "seed": 3, "tokens_per_s": 800.0,
              "error": "Training diverged: loss is nan at step 10"}  # fmt: skip
    write_job(folder, num, "1e-3", "cosine", 3, failed, [(0, 10.0)])
    write_job(folder, num + 1, "1e-3", "cosine", 4, None, [(0, 10.5), (10, 1.0)])  # still running
    stale = write_job(folder, num + 2, "1e-3", "cosine", 5, None, [(0, 11.0)])  # killed: no summary, silent
    old = time.time() - 2 * 3600
    for path in [stale, *stale.iterdir()]:
        os.utime(path, (old, old))
    (folder / "multirun.yaml").write_text("hydra: {}\n")
    return folder


def test_jobs_are_read_with_their_status_seed_and_metrics(sweep):
    s = load_sweep(sweep)
    assert s.swept == ["optimizer.lr", "scheduler"]
    assert s.common == {"debug": "smoke", "paths.data_dir": "/data"}
    assert [j.seed for j in s.jobs] == [0, 1, 2, 0, 1, 2, 3, 4, 5]  # Hydra's job order
    assert [j.status for j in s.jobs][-3:] == ["diverged", "running", "unknown"]
    running = s.jobs[-2]
    assert (running.final_val_loss, running.best_val_loss, running.tokens_per_s) == (1.0, 1.0, 555.0)
    assert s.jobs[1].best_val_loss == 3.1 and s.jobs[1].final_val_loss == 3.2
    assert s.jobs[-3].error == "Training diverged: loss is nan at step 10"


def test_config_stats_are_mean_and_sample_std_over_completed_seeds_only(sweep):
    s = load_sweep(sweep)
    first, second = s.configs
    assert first.label == "optimizer.lr=1e-3, scheduler=cosine" and len(first.jobs) == 6
    assert first.n_seeds == 3 and first.status == "3 completed, 1 diverged, 1 running, 1 unknown"
    mean, std, n = first.stats("final_val_loss")
    assert (mean, std, n) == (pytest.approx(3.2), pytest.approx(0.2), 3)  # the running job's 1.0 is left out
    assert first.stats("best_val_loss")[0] == pytest.approx((3.0 + 3.1 + 3.4) / 3)
    assert first.stats("hellaswag_acc_norm")[:2] == (pytest.approx(0.26), pytest.approx(0.01))
    assert second.stats("final_val_loss")[:2] == (pytest.approx(2.5), pytest.approx(0.5))
    assert second.stats("best_val_loss")[0] == pytest.approx((1.5 + 2.5 + 3.0) / 3)
    assert second.stats("hellaswag_acc_norm") == (pytest.approx(0.31), pytest.approx(statistics.stdev([0.30, 0.32])), 2)
    assert second.stats("tokens_per_s")[:2] == (pytest.approx(950.0), pytest.approx(50.0))


def test_the_script_prints_and_writes_the_tables_and_plots(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    written = load_script("summarize_sweep").main([str(sweep), "--out", str(out), "--by-seed"])
    names = sorted(p.name for p in written)
    assert names == ["jobs.csv", "summary.csv", "summary.md", "val_loss_curves.png",
                     "val_loss_vs_optimizer.lr.png", "val_loss_vs_scheduler.png"]  # fmt: skip
    for png in out.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 5_000
    printed = capsys.readouterr().out
    md = (out / "summary.md").read_text()
    for text in (printed, md):
        assert "9 jobs: 6 completed, 3 not completed (left out of means)." in text
        assert "Common overrides: debug=smoke paths.data_dir=/data" in text
        assert ("| optimizer.lr=1e-3, scheduler=cosine | 3 | 3.2000 ± 0.2000 | 3.1667 ± 0.2082 | 1.0667 ± 0.0667 "
                "| 0.2600 ± 0.0100 | 1100 ± 100 | 3 completed, 1 diverged, 1 running, 1 unknown |") in text  # fmt: skip
        wsd = "| optimizer.lr=3e-3, scheduler=wsd | 3 | 2.5000 ± 0.5000 | 2.3333 ± 0.7638 | 0.8333 ± 0.1667 |"
        assert wsd + " 0.3100 ± 0.0141 | 950 ± 50 | 3 completed |" in text
        assert ("| optimizer.lr=1e-3,scheduler=cosine/seed=3 | 3 | diverged | 10 | 10.0000 | 10.0000 | — | — | 800 "
                "| Training diverged: loss is nan at step 10 |") in text  # fmt: skip
        running = "| optimizer.lr=1e-3,scheduler=cosine/seed=4 | 4 | running | 10 | 1.0000 | 1.0000 | — | — | 555 |  |"
        assert running in text
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["scheduler"] for r in rows] == ["cosine", "wsd"] and [r["n_seeds"] for r in rows] == ["3", "3"]
    assert float(rows[1]["final_val_loss_mean"]) == pytest.approx(2.5)
    assert float(rows[1]["final_val_loss_std"]) == pytest.approx(0.5)
    jobs = list(csv.DictReader((out / "jobs.csv").open()))
    assert len(jobs) == 9 and [j["status"] for j in jobs].count("completed") == 6
    assert jobs[3]["status"] == "diverged" and jobs[3]["error"].startswith("Training diverged")
    assert jobs[4]["hellaswag_acc_norm"] == "" and jobs[4]["final_val_loss"] == "1.0"  # the running job so far


def test_the_script_prints_only_the_config_table_by_default_and_writes_into_the_sweep(sweep, capsys):
    load_script("summarize_sweep").main([str(sweep)])
    printed = capsys.readouterr().out
    assert "## Per config" in printed and "## Per job" not in printed
    assert (sweep / "summary.md").is_file() and (sweep / "val_loss_curves.png").is_file()
    load_script("summarize_sweep").main([str(sweep)])  # its own outputs are not mistaken for jobs
    assert "9 jobs:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "metric, best_first", [("final_val_bpb", "wsd"), ("hellaswag_acc_norm", "wsd"), ("tokens_per_s", "cosine")]
)
def test_rank_by_lists_the_best_config_first(sweep, capsys, metric, best_first):
    load_script("summarize_sweep").main([str(sweep), "--rank-by", metric])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| optimizer.lr=")]
    assert f"scheduler={best_first} " in table[0] and len(table) == 2


def test_a_missing_or_empty_folder_is_one_line_and_status_2(tmp_path, capsys):
    script = load_script("summarize_sweep")
    for folder, message in [(tmp_path / "nope", "no such sweep folder"), (tmp_path, "no job folders")]:
        with pytest.raises(SystemExit) as exit_:
            script.main([str(folder)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_mean_curve_is_the_mean_and_min_max_of_the_seeds_that_reached_each_step():
    steps, mean, low, high = mean_curve([[(0, 4.0), (5, 2.0)], [(0, 6.0), (5, 3.0), (10, 1.0)]])
    assert steps == [0, 5, 10]
    assert mean == [5.0, 2.5, 1.0] and low == [4.0, 2.0, 1.0] and high == [6.0, 3.0, 1.0]


def test_numeric_keys_get_a_numeric_axis_and_categorical_keys_named_ticks(sweep):
    s = load_sweep(sweep)
    lr = plot_vs_key(s, "optimizer.lr").axes[0]
    means = sorted((float(x), float(y)) for c in lr.containers for x, y in c.lines[0].get_xydata())
    assert means == [(1e-3, pytest.approx(3.2)), (3e-3, pytest.approx(2.5))]  # mean of each config at its lr
    dots = sorted(tuple(xy) for c in lr.collections if isinstance(c, PathCollection) for xy in c.get_offsets())
    expected = [(1e-3, 3.0), (1e-3, 3.2), (1e-3, 3.4), (3e-3, 2.0), (3e-3, 2.5), (3e-3, 3.0)]  # each seed's dot
    assert [x for xy in dots for x in xy] == pytest.approx([x for xy in expected for x in xy])
    scheduler = plot_vs_key(s, "scheduler").axes[0]
    assert [t.get_text() for t in scheduler.get_xticklabels()] == ["cosine", "wsd"]


def test_a_single_run_folder_is_a_sweep_of_one(sweep):
    job = sweep / "optimizer.lr=3e-3,scheduler=wsd" / "seed=1"
    s = load_sweep(job)
    assert len(s.jobs) == 1 and s.jobs[0].final_val_loss == 2.5 and s.configs[0].label == "all jobs"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
