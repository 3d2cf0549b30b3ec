"""scripts/summarize_sweep.py and gptlab.sweep_summary on a synthetic sweep folder with known metrics."""

import csv
import importlib.util
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import pytest
import scipy.stats
import yaml
from matplotlib.collections import PathCollection

from gptlab.sweep_summary import higher_is_better, load_sweep, mean_curve, plot_vs_key, value_at
from gptlab.sweep_verdicts import compare
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
                     "val_loss_vs_optimizer.lr.png", "val_loss_vs_scheduler.png", "verdicts.csv"]  # fmt: skip
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
    table = config_table_rows(capsys.readouterr().out)
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


# A mixture sweep: data.mixture.code.weight -> per seed: (val loss of source web, of source code.v2)
MIXTURE = {"0.2": {0: (3.0, 5.0), 1: (3.2, 5.4)}, "0.8": {0: (3.6, 4.0), 1: (3.8, 4.2)}}
HEADERS = "| final val loss | best val loss | final val bpb | HellaSwag acc_norm | tokens/s |"  # as before mixtures
CONFIG_HEADER = "| config | seeds " + HEADERS + " status |"
JOB_HEADER = "| job | seed | status | step " + HEADERS + " error |"
MIXTURE_CONFIG_HEADER = "| config | seeds " + HEADERS + " val loss web | val loss code.v2 | status |"


@pytest.fixture
def mixture_sweep(tmp_path) -> Path:
    """2 code weights x 2 seeds of a mixture of sources web and code.v2; the last job's summary.json lacks
    val_by_source (its per-source losses are in metrics.jsonl alone), and a job of weight 0.2 is still running."""
    folder = tmp_path / "multiruns" / "2026-01-02_00-00-00_mix001"
    jobs = [(weight, seed, losses) for weight, seeds in MIXTURE.items() for seed, losses in seeds.items()]
    for num, (weight, seed, (web, code)) in enumerate(jobs):
        job = folder / f"data.mixture.code.weight={weight}" / f"seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        overrides = ["data=mixture", f"data.mixture.code.weight={weight}", f"seed={seed}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
        pooled = 0.5 * (web + code)
        records = [{"step": 0, "val/loss": 11.0, "val/bpb": 4.0, "val/loss/web": 11.0, "val/bpb/web": 4.0,
                    "val/loss/code.v2": 11.0, "val/bpb/code.v2": 3.0},
                   {"step": 20, "val/loss": pooled, "val/bpb": pooled / 3, "val/loss/web": web,
                    "val/bpb/web": web / 3, "val/loss/code.v2": code, "val/bpb/code.v2": code / 4}]  # fmt: skip
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = completed(pooled, None, 1000.0, seed) | {"tokens": 2000}  # 100 tokens per step
        summary["data_mixture"] = {"web": {"weight": 1 - float(weight), "share": 1 - float(weight), "tokens": 1000,
                                           "passes": 0.1, "repeats": 0},
                                   "code.v2": {"weight": float(weight), "share": float(weight), "tokens": 1000,
                                               "passes": 0.2, "repeats": 0}}  # fmt: skip
        if num < len(jobs) - 1:
            summary["val_by_source"] = {"web": {"loss": web, "bpb": web / 3},
                                        "code.v2": {"loss": code, "bpb": code / 4}}  # fmt: skip
        (job / "summary.json").write_text(json.dumps(summary))
    running = folder / "data.mixture.code.weight=0.2" / "seed=2"
    (running / ".hydra").mkdir(parents=True)
    overrides = ["data=mixture", "data.mixture.code.weight=0.2", "seed=2"]
    (running / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (running / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": len(jobs)}}}))
    (running / "metrics.jsonl").write_text(json.dumps({"step": 10, "val/loss": 1.5, "val/loss/web": 1.0}) + "\n")
    return folder


def test_a_mixture_sweep_has_a_val_loss_column_per_source_in_the_tables_and_csvs(mixture_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    load_script("summarize_sweep").main([str(mixture_sweep), "--out", str(out), "--by-seed"])
    printed = capsys.readouterr().out
    md = (out / "summary.md").read_text()
    for text in (printed, md):
        assert MIXTURE_CONFIG_HEADER in text and "val bpb web" not in text  # per-source bpb: in the CSVs only
        assert ("| data.mixture.code.weight=0.2 | 2 | 4.1500 ± 0.2121 | 4.1500 ± 0.2121 | 1.3833 ± 0.0707 | — "
                "| 1000 ± 0 | 3.1000 ± 0.1414 | 5.2000 ± 0.2828 | 2 completed, 1 running |") in text  # fmt: skip
        assert "| data.mixture.code.weight=0.8 | 2 | 3.9000 ± 0.1414 |" in text
        assert "| 3.7000 ± 0.1414 | 4.1000 ± 0.1414 | 2 completed |" in text  # the fallback's 3.8 and 4.2 among them
        assert JOB_HEADER.replace("| error |", "| val loss web | val loss code.v2 | error |") in text
        assert "| data.mixture.code.weight=0.8/seed=1 | 1 | completed | 20 |" in text
        assert "| 1000 | 3.8000 | 4.2000 |  |" in text  # from metrics.jsonl
        running = "| running | 10 | 1.5000 | 1.5000 | — | — | — | 1.0000 | — |"
        assert "| data.mixture.code.weight=0.2/seed=2 | 2 " + running in text  # its web loss so far, in no mean
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["data.mixture.code.weight"] for r in rows] == ["0.2", "0.8"]
    assert float(rows[0]["final_val_loss/web_mean"]) == pytest.approx(3.1)
    assert float(rows[0]["final_val_loss/code.v2_std"]) == pytest.approx(statistics.stdev([5.0, 5.4]))
    assert float(rows[1]["final_val_loss/code.v2_mean"]) == pytest.approx(4.1)
    assert float(rows[1]["final_val_bpb/code.v2_mean"]) == pytest.approx(4.1 / 4)
    assert float(rows[1]["final_val_bpb/web_mean"]) == pytest.approx(3.7 / 3)
    jobs = list(csv.DictReader((out / "jobs.csv").open()))
    assert [j["final_val_loss/web"] for j in jobs] == ["3.0", "3.2", "1.0", "3.6", "3.8"]
    assert jobs[2]["final_val_loss/code.v2"] == "" and jobs[2]["final_val_bpb/web"] == ""  # running: none yet
    s = load_sweep(mixture_sweep)
    assert list(s.metrics)[-4:] == ["final_val_loss/web", "final_val_bpb/web", "final_val_loss/code.v2",
                                    "final_val_bpb/code.v2"]  # fmt: skip
    assert plot_vs_key(s, "data.mixture.code.weight", "final_val_loss/web").axes[0].get_ylabel() == "val loss web"


def test_a_job_without_val_by_source_falls_back_to_the_last_values_in_metrics_jsonl(mixture_sweep):
    fallback = load_sweep(mixture_sweep).jobs[-2]
    assert fallback.name == "data.mixture.code.weight=0.8/seed=1" and fallback.completed
    assert "val_by_source" not in json.loads((mixture_sweep / fallback.name / "summary.json").read_text())
    assert fallback.by_source == {
        "final_val_loss/web": 3.8, "final_val_bpb/web": pytest.approx(3.8 / 3),
        "final_val_loss/code.v2": 4.2, "final_val_bpb/code.v2": pytest.approx(4.2 / 4),
    }  # fmt: skip
    summary = mixture_sweep / "data.mixture.code.weight=0.2" / "seed=0" / "summary.json"
    written = json.loads(summary.read_text())
    written["val_by_source"]["web"] = {"loss": 2.5, "bpb": None}  # summary.json first, metrics.jsonl for what it lacks
    summary.write_text(json.dumps(written))
    job = load_sweep(mixture_sweep).jobs[0]
    assert job.by_source["final_val_loss/web"] == 2.5 and job.by_source["final_val_bpb/web"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "metric, best_first",
    [("final_val_loss/web", "0.2"), ("final_val_loss/code.v2", "0.8"), ("final_val_bpb/web", "0.2"),
     ("final_val_loss", "0.8")],
)  # fmt: skip
def test_rank_by_a_source_lists_the_config_with_its_lowest_loss_first(mixture_sweep, capsys, metric, best_first):
    load_script("summarize_sweep").main([str(mixture_sweep), "--rank-by", metric])
    table = config_table_rows(capsys.readouterr().out)
    assert len(table) == 2 and table[0].startswith(f"| data.mixture.code.weight={best_first} |")


def test_rank_by_an_unknown_metric_or_source_is_one_line_and_status_2(mixture_sweep, sweep, capsys):
    for folder, metric in [(mixture_sweep, "final_val_loss/nope"), (sweep, "final_val_loss/web"), (sweep, "loss")]:
        with pytest.raises(SystemExit) as exit_:
            load_script("summarize_sweep").main([str(folder), "--rank-by", metric])
        assert exit_.value.code == 2 and f"cannot rank by {metric!r}" in capsys.readouterr().err


def test_a_sweep_without_a_mixture_has_no_per_source_columns(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    load_script("summarize_sweep").main([str(sweep), "--out", str(out), "--by-seed"])
    md = (out / "summary.md").read_text()
    assert md in capsys.readouterr().out
    headers = [line for line in md.splitlines() if line.startswith(("| config |", "| job |"))]
    assert headers == [CONFIG_HEADER, JOB_HEADER]
    assert "| val loss " not in md and "/" not in "".join(load_sweep(sweep).metrics)
    columns = next(csv.reader((out / "summary.csv").open()))
    assert columns == ["config", "optimizer.lr", "scheduler", "n_seeds", "final_val_loss_mean", "final_val_loss_std",
                       "best_val_loss_mean", "best_val_loss_std", "final_val_bpb_mean", "final_val_bpb_std",
                       "hellaswag_acc_norm_mean", "hellaswag_acc_norm_std", "tokens_per_s_mean", "tokens_per_s_std",
                       "status"]  # fmt: skip
    assert next(csv.reader((out / "jobs.csv").open())) == [
        "job", "config", "optimizer.lr", "scheduler", "seed", "status", "step", "final_val_loss", "best_val_loss",
        "final_val_bpb", "hellaswag_acc_norm", "tokens_per_s", "error"]  # fmt: skip


def config_table_rows(printed: str) -> list[str]:
    """The rows of the per-config table (the verdict table after it names configs too)."""
    section = printed.split("## Per config")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| config |")]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A grid for paired verdicts, in the order Hydra ran it: (lr, scheduler) -> final val loss of seeds 0-3
# (None: no job folder; "diverged": a failed job). Folder names sort 1e-3 before 3e-4 and cosine before wsd.
PAIRED = {
    ("3e-4", "wsd"): [3.00, 3.31, 2.79, 3.10],
    ("3e-4", "cosine"): [3.06, 3.34, None, 3.17],
    ("1e-3", "wsd"): [2.91, 3.19, 2.72, 3.01],
    ("1e-3", "cosine"): [2.95, 3.27, 2.77, "diverged"],
}
EARLIER = {("3e-4", "wsd"): 0.6, ("3e-4", "cosine"): 0.5, ("1e-3", "wsd"): 0.3, ("1e-3", "cosine"): 0.4}  # at step 10
ENDED_EARLY = ("1e-3", "wsd", 1)  # this job completed after 10 steps (5120 tokens), the others after 20
TOKENS_PER_STEP = 512
LINES = ["optimizer.lr=1e-3 vs 3e-4 at scheduler=wsd", "optimizer.lr=1e-3 vs 3e-4 at scheduler=cosine",
         "scheduler=cosine vs wsd at optimizer.lr=3e-4", "scheduler=cosine vs wsd at optimizer.lr=1e-3"]  # fmt: skip


def paired_records(final: float, earlier: float, ended_early: bool) -> list[dict]:
    """metrics.jsonl: validation at steps 0, 10 and 20 (final); "tokens" only on the training records."""
    at_10 = final if ended_early else final + earlier
    records = [{"step": 0, "val/loss": 11.0, "val/bpb": 11.0 / 3},
               {"step": 10, "train/loss": 5.0, "tokens": 10.0 * TOKENS_PER_STEP},
               {"step": 10, "val/loss": at_10, "val/bpb": at_10 / 3}]  # fmt: skip
    if not ended_early:
        end = {"step": 20, "val/loss": final, "val/bpb": final / 3, "hellaswag/acc_norm": 0.6 - final / 10}
        records += [{"step": 20, "train/loss": 4.0, "tokens": 20.0 * TOKENS_PER_STEP}, end]
    return records


@pytest.fixture
def paired_sweep(tmp_path) -> Path:
    folder = tmp_path / "multiruns" / "2026-01-03_00-00-00_pair01"
    jobs = [(config, seed, final) for config, finals in PAIRED.items() for seed, final in enumerate(finals)]
    for num, ((lr, scheduler), seed, final) in enumerate(jobs):
        if final is None:
            continue
        if final == "diverged":
            summary = {"status": "diverged", "step": 10, "val_loss": None, "seed": seed, "error": "loss is nan"}
            write_job(folder, num, lr, scheduler, seed, summary, [])
            continue
        ended_early = (lr, scheduler, seed) == ENDED_EARLY
        summary = completed(final, 0.6 - final / 10, 1000.0, seed) | {"mfu": 0.4 - final / 100}
        summary |= {"step": 10, "tokens": 5120} if ended_early else {"tokens": 10240}
        job = write_job(folder, num, lr, scheduler, seed, summary, [])
        records = paired_records(final, EARLIER[lr, scheduler], ended_early)
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_jobs_that_share_a_seed_are_paired_on_the_seeds_completed_in_both(paired_sweep):
    verdicts = compare(load_sweep(paired_sweep))
    assert verdicts.baselines == {"optimizer.lr": "3e-4", "scheduler": "wsd"}  # first as Hydra ran them
    assert [v.label for v in verdicts.items] == LINES
    assert [v.seeds for v in verdicts.items] == [[0, 1, 2, 3], [0, 1], [0, 1, 3], [0, 1, 2]]
    assert [v.left_out for v in verdicts.items] == [
        [],
        ["seed 2 (no job in optimizer.lr=3e-4)", "seed 3 (diverged in optimizer.lr=1e-3)"],
        ["seed 2 (no job in scheduler=cosine)"],
        ["seed 3 (diverged in scheduler=cosine)"],
    ]
    lr_at_wsd, lr_at_cosine = verdicts.items[0].comparison, verdicts.items[1].comparison
    wsd_3e4, wsd_1e3 = PAIRED["3e-4", "wsd"], PAIRED["1e-3", "wsd"]
    assert lr_at_wsd.n == 4 and lr_at_wsd.mean_diff == pytest.approx(statistics.fmean(
        t - b for b, t in zip(wsd_3e4, wsd_1e3)))  # fmt: skip
    assert lr_at_wsd.p == pytest.approx(scipy.stats.ttest_rel(wsd_1e3, wsd_3e4).pvalue)
    assert lr_at_wsd.noise_floor == pytest.approx(statistics.stdev(wsd_3e4))
    assert lr_at_wsd.verdict == "better"  # lower on every seed, beyond their spread
    assert lr_at_cosine.n == 2 and lr_at_cosine.p == pytest.approx(
        scipy.stats.ttest_rel([2.95, 3.27], [3.06, 3.34]).pvalue)  # fmt: skip


def test_baselines_are_chosen_with_baseline_and_match_numbers(paired_sweep):
    s = load_sweep(paired_sweep)
    verdicts = compare(s, baselines={"scheduler": "cosine", "optimizer.lr": "0.001"})
    assert verdicts.baselines == {"optimizer.lr": "1e-3", "scheduler": "cosine"}
    assert [v.label for v in verdicts.items] == [
        "optimizer.lr=3e-4 vs 1e-3 at scheduler=wsd", "optimizer.lr=3e-4 vs 1e-3 at scheduler=cosine",
        "scheduler=wsd vs cosine at optimizer.lr=3e-4", "scheduler=wsd vs cosine at optimizer.lr=1e-3"]  # fmt: skip
    default = compare(s).items[0].comparison
    flipped = verdicts.items[0].comparison
    assert flipped.mean_diff == pytest.approx(-default.mean_diff) and flipped.p == pytest.approx(default.p)
    assert flipped.verdict == "worse" and default.verdict == "better"


@pytest.mark.parametrize(
    "option, message",
    [("nope=1", "'nope' is not a swept key; swept keys: optimizer.lr, scheduler"),
     ("scheduler=linear", "scheduler takes the values wsd, cosine")],
)  # fmt: skip
def test_a_baseline_that_is_not_in_the_sweep_is_one_line_and_status_2(paired_sweep, capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        load_script("summarize_sweep").main([str(paired_sweep), "--baseline", option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_higher_is_better_for_accuracies_throughput_and_mfu():
    higher = ["hellaswag_acc_norm", "hellaswag_acc", "val_acc", "accuracy", "tokens_per_s", "samples_per_s", "mfu"]
    lower = ["final_val_loss", "final_val_loss/web", "final_val_bpb", "best_val_loss", "grad_accum", "wall_s"]
    assert all(higher_is_better(m) for m in higher) and not any(higher_is_better(m) for m in lower)


def test_an_accuracy_or_a_summary_key_that_rises_is_better(paired_sweep):
    s = load_sweep(paired_sweep)
    by_loss, by_acc, by_mfu = (compare(s, m).items[0].comparison for m in ("val_loss", "hellaswag_acc_norm", "mfu"))
    assert by_loss.mean_diff < 0 and by_acc.mean_diff > 0 and by_mfu.mean_diff > 0  # loss down, the others up
    assert by_acc.mean_diff == pytest.approx(-by_loss.mean_diff / 10)
    assert by_loss.verdict == by_acc.verdict == by_mfu.verdict == "better"
    assert compare(s, "val_bpb").metric == "final_val_bpb" and compare(s, "mfu").metric == "mfu"


def test_an_unknown_metric_is_one_line_and_status_2(paired_sweep, capsys):
    mistakes = [(["--metric", "nope"], "cannot compare by 'nope'"),
                (["--metric", "mfu", "--at-tokens", "5120"], "--at-tokens reads metrics.jsonl")]  # fmt: skip
    for options, message in mistakes:
        with pytest.raises(SystemExit) as exit_:
            load_script("summarize_sweep").main([str(paired_sweep), *options])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_per_source_metric_is_compared_per_source(mixture_sweep):
    verdicts = compare(load_sweep(mixture_sweep), "val_loss/code.v2")
    (verdict,) = verdicts.items
    assert verdicts.metric == "final_val_loss/code.v2" and verdict.label == "data.mixture.code.weight=0.8 vs 0.2"
    assert verdict.seeds == [0, 1] and verdict.left_out == [
        "seed 2 (no job in data.mixture.code.weight=0.8; running in data.mixture.code.weight=0.2)"]  # fmt: skip
    c = verdict.comparison
    assert c.mean_diff == pytest.approx(-1.1)
    assert c.p == pytest.approx(scipy.stats.ttest_rel([4.0, 4.2], [5.0, 5.4]).pvalue)
    assert c.verdict == "no detectable difference"  # t = -11 with one degree of freedom: p = 0.058
    assert verdicts.lines()[0].startswith(
        "data.mixture.code.weight=0.8 vs 0.2: Δval_loss/code.v2 = -1.1 [-2.4, +0.2] (95% CI), p = 0.058, n = 2 — no "
    )


def test_value_at_is_the_point_at_x_else_the_interpolation_between_its_neighbours():
    points = [(0.0, 11.0), (5120.0, 4.0), (10240.0, 3.0)]
    assert value_at(points, 5120) == 4.0 and value_at(points, 0) == 11.0 and value_at(points, 10240) == 3.0
    assert value_at(points, 7680) == pytest.approx(3.5) and value_at(points, 1280) == pytest.approx(9.25)
    assert value_at(points, 10241) is None and value_at([], 1) is None


def test_at_tokens_interpolates_between_validations_and_drops_a_job_that_ended_before(paired_sweep):
    s = load_sweep(paired_sweep)
    assert s.jobs[0].logged["val/loss"] == [(0.0, 11.0), (5120.0, 3.6), (10240.0, 3.0)]  # steps x 512 tokens
    verdicts = compare(s, "val_loss", at_tokens=7680)  # halfway between the validations at steps 10 and 20
    first = verdicts.items[0]
    assert first.seeds == [0, 2, 3] and first.left_out == [
        "seed 1 (ended before 7,680 tokens, at 5,120 in optimizer.lr=1e-3)"]  # fmt: skip
    baseline = [PAIRED["3e-4", "wsd"][i] + 0.6 / 2 for i in (0, 2, 3)]
    treatment = [PAIRED["1e-3", "wsd"][i] + 0.3 / 2 for i in (0, 2, 3)]
    assert first.comparison.mean_diff == pytest.approx(statistics.fmean(t - b for b, t in zip(baseline, treatment)))
    assert first.comparison.p == pytest.approx(scipy.stats.ttest_rel(treatment, baseline).pvalue)
    assert verdicts.lines()[0].startswith("optimizer.lr=1e-3 vs 3e-4 at scheduler=wsd: Δval_loss at 7,680 tokens = ")
    assert verdicts.lines()[0].endswith("; left out: seed 1 (ended before 7,680 tokens, at 5,120 in optimizer.lr=1e-3)")
    exact = compare(s, "val_bpb", at_tokens=5120).items[0]  # the validation at step 10 itself, for every job
    assert exact.seeds == [0, 1, 2, 3]
    assert exact.comparison.mean_diff == pytest.approx(statistics.fmean(
        (t + (0.3 if i != 1 else 0)) / 3 - (b + 0.6) / 3
        for i, (b, t) in enumerate(zip(PAIRED["3e-4", "wsd"], PAIRED["1e-3", "wsd"]))))  # fmt: skip


def test_at_tokens_works_per_source_with_the_tokens_per_step_of_summary_json(mixture_sweep):
    verdicts = compare(load_sweep(mixture_sweep), "final_val_loss/web", at_tokens=1000)  # step 10 of 20
    (verdict,) = verdicts.items
    assert verdict.seeds == [0, 1] and verdict.comparison.mean_diff == pytest.approx(0.3)  # (11 + web) / 2 each
    assert verdict.comparison.p == 0.0 and verdict.comparison.verdict == "worse"  # +0.3 on both seeds, up to rounding


def test_the_script_prints_and_writes_the_verdicts(paired_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    written = load_script("summarize_sweep").main([str(paired_sweep), "--out", str(out), "--by-seed"])
    printed = capsys.readouterr().out
    md = (out / "summary.md").read_text()
    assert md in printed
    verdicts = compare(load_sweep(paired_sweep))
    assert "## Verdicts (final_val_loss, paired t-test over seeds)" in md
    assert "(optimizer.lr=3e-4, scheduler=wsd)" in md and "(lower is better)" in md
    for text in verdicts.lines():
        assert f"- {text}\n" in md
    assert verdicts.lines()[1].endswith(
        "n = 2 — no detectable difference; left out: seed 2 (no job in optimizer.lr=3e-4), "
        "seed 3 (diverged in optimizer.lr=1e-3)")  # fmt: skip
    assert "| comparison | Δ | CI low | CI high | p | n | noise floor | detectable Δ | verdict |" in md
    c = verdicts.items[0].comparison
    row = f"| {LINES[0]} | {c.mean_diff:.4g} | {c.ci_low:.4g} | {c.ci_high:.4g} | {c.p:.3f} | 4 |"
    assert row + f" {c.noise_floor:.4g} | {c.detectable:.4g} | better |" in md
    rows = list(csv.DictReader((out / "verdicts.csv").open()))
    assert [r["comparison"] for r in rows] == LINES and [r["n"] for r in rows] == ["4", "2", "3", "3"]
    assert [r["seeds"] for r in rows] == ["0 1 2 3", "0 1", "0 1 3", "0 1 2"]
    assert float(rows[0]["p"]) == pytest.approx(c.p)
    assert float(rows[0]["detectable_delta"]) == pytest.approx(c.detectable)
    assert rows[2]["left_out"] == "seed 2 (no job in scheduler=cosine)" and rows[2]["context"] == "optimizer.lr=3e-4"
    assert (out / "verdicts.csv") in written


def test_the_script_plots_another_metric_and_runs_the_wilcoxon_test(paired_sweep, tmp_path, capsys):
    out = tmp_path / "report"
    options = ["--metric", "val_bpb", "--at-tokens", "7680", "--test", "wilcoxon", "--baseline", "scheduler=cosine"]
    written = load_script("summarize_sweep").main([str(paired_sweep), "--out", str(out), *options])
    assert {"val_loss_vs_scheduler.png", "val_bpb_at_7680_tokens_vs_scheduler.png"} <= {p.name for p in written}
    printed = capsys.readouterr().out
    assert "## Verdicts (final_val_bpb at 7,680 tokens, Wilcoxon signed-rank test over seeds)" in printed
    wsd_vs_cosine = [line for line in printed.splitlines() if line.startswith("- scheduler=wsd vs cosine at")]
    assert "(Wilcoxon), n = 3 — " in wsd_vs_cosine[0] and "seed 2 (no job in scheduler=cosine)" in wsd_vs_cosine[0]
    assert "(Wilcoxon), n = 2 — " in wsd_vs_cosine[1] and wsd_vs_cosine[1].endswith(
        "left out: seed 1 (ended before 7,680 tokens, at 5,120 in scheduler=wsd), seed 3 (diverged in scheduler=cosine)"
    )
    rows = list(csv.DictReader((out / "verdicts.csv").open()))
    assert {r["test"] for r in rows} == {"wilcoxon"} and {r["at_tokens"] for r in rows} == {"7680"}
    for metric, name in [("val_bpb", "val_bpb"), ("hellaswag_acc_norm", "hellaswag_acc_norm"), ("mfu", "mfu")]:
        written = load_script("summarize_sweep").main([str(paired_sweep), "--out", str(out), "--metric", metric])
        assert f"{name}_vs_optimizer.lr.png" in {p.name for p in written}


def test_one_seed_is_no_test_and_no_swept_key_is_no_verdict(paired_sweep, capsys):
    for job in paired_sweep.glob("*/seed=*"):
        if job.name != "seed=0":
            shutil.rmtree(job)
    load_script("summarize_sweep").main([str(paired_sweep)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == [f"- {label}" for label in LINES]
    assert all(line.endswith(", n = 1 — no test possible with one seed") for line in lines)
    one_config = paired_sweep / "optimizer.lr=3e-4,scheduler=wsd"
    write_job(paired_sweep, 1, "3e-4", "wsd", 1, completed(3.31, None, 1000.0, 1), [(0, 11.0), (20, 3.31)])
    load_script("summarize_sweep").main([str(one_config)])  # two jobs that differ in their seed alone
    printed = capsys.readouterr().out
    assert "2 jobs: 2 completed" in printed and "Verdicts" not in printed
    assert (one_config / "verdicts.csv").read_text().startswith("comparison,key,value,baseline,")
    assert len((one_config / "verdicts.csv").read_text().splitlines()) == 1


def test_the_error_bars_are_95_percent_confidence_intervals_over_seeds(paired_sweep):
    ax = plot_vs_key(load_sweep(paired_sweep), "scheduler").axes[0]
    bars = {}
    for container in ax.containers:
        for (x, low), (_, high) in container.lines[2][0].get_segments():
            bars[round(float(x), 6), round((low + high) / 2, 6)] = (high - low) / 2
    wsd = PAIRED["3e-4", "wsd"]
    half = scipy.stats.t.ppf(0.975, 3) * statistics.stdev(wsd) / math.sqrt(4)
    first_series = [half_width for (x, mean), half_width in bars.items() if mean == round(statistics.fmean(wsd), 6)]
    assert first_series == [pytest.approx(half)]
