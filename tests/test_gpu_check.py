"""scripts/gpu_check.py: the synthetic HellaSwag file, the table, the budget and failures (fast), and the whole
--smoke run on CPU in a subprocess (slow): every row of the table, and the section appended where --results says."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.config import load_config
from gptlab.eval.hellaswag import FIELDS, load_examples
from tests.conftest import ROOT, compose_train

SCRIPT = ROOT / "scripts" / "gpu_check.py"
# the fields of HellaSwag's hellaswag_val.jsonl (rowanz/hellaswag), every one of them
SCHEMA = {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id"}
ROWS = [  # the measurements of the table, in order; each part's rows follow its name in PARTS
    "device", "torch", "command",
    "bench_train: gptlab", "bench_train: plain PyTorch loop", "bench_train: gptlab / plain",
    "bench_train: MFU gptlab", "bench_train: MFU plain",
    "FSDP, 1 device", "FSDP: tokens/s",
    "HellaSwag: examples/s", "HellaSwag: wall time",
    "peak memory, activation checkpointing off", "peak memory, activation checkpointing on",
    "activation checkpointing saves",
    "wall time",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(output: str) -> list[list[str]]:
    """The cells of each row of the markdown table in output (header and rule left out)."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def run_script(*args: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPTLAB_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_synthetic_hellaswag_has_the_real_schema(gpu_check, tmp_path):
    records = gpu_check.synthetic_hellaswag()
    assert len(records) == 10_042
    assert all(set(r) == SCHEMA for r in records)
    assert [r["ind"] for r in records] == list(range(10_042))
    for r in records[:500]:
        assert r["ctx"] == f"{r['ctx_a']} {r['ctx_b']}"
        assert r["split"] == "val" and r["split_type"] in ("indomain", "zeroshot")
        assert r["source_id"].split("~")[0] in ("activitynet", "wikihow")
        assert type(r["label"]) is int and 0 <= r["label"] < 4
        assert len(r["endings"]) == 4 and all(isinstance(e, str) and e for e in r["endings"])
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for prompt in FIELDS:  # gptlab reads it with either prompt
        examples = load_examples(path, prompt)
        assert len(examples) == 10_042 and [e.label for e in examples] == [r["label"] for r in records]


def test_synthetic_hellaswag_is_deterministic(gpu_check):
    assert gpu_check.synthetic_hellaswag(20) == gpu_check.synthetic_hellaswag(20)
    assert gpu_check.synthetic_hellaswag(20) != gpu_check.synthetic_hellaswag(20, seed=1)


def test_markdown_table(gpu_check):
    table = gpu_check.markdown([("a", "1", "x"), ("b", "2", "y")])
    assert table.splitlines() == ["| measurement | value | unit / notes |", "| --- | ---: | --- |", "| a | 1 | x |",
                                  "| b | 2 | y |"]  # fmt: skip
    assert table_rows(table) == [["a", "1", "x"], ["b", "2", "y"]]


def test_parts_and_their_timeouts_fit_the_budget(gpu_check):
    for mode, settings in gpu_check.SETTINGS.items():
        assert set(gpu_check.PARTS) <= set(settings), mode
        assert sum(settings[part]["timeout"] for part in gpu_check.PARTS) <= settings["budget"], mode
    assert gpu_check.SETTINGS["full"]["budget"] <= 8 * 60 - 30  # one device call of 8 minutes, with start-up
    assert gpu_check.SETTINGS["full"]["hellaswag"]["examples"] == 10_042


@pytest.mark.parametrize("mode", ["full", "smoke"])
def test_training_settings_pass_the_config_checks(gpu_check, mode):
    """What the device would run composes and validates here, before any device time is spent on it."""
    settings = gpu_check.SETTINGS[mode]
    load_config(compose_train(settings["train"]["overrides"]))  # bench_train adds only its own step budget
    train_cfg, plan = load_config(compose_train(gpu_check.fsdp_overrides(settings["fsdp"])))
    assert train_cfg.distributed.name == "fsdp" and train_cfg.trainer.devices == 1
    assert plan.total_steps == settings["fsdp"]["steps"]
    if mode == "full":
        assert train_cfg.model.n_layer == 12 and train_cfg.model.compile and plan.tokens_per_step == 131072


def test_parse_args(gpu_check):
    assert gpu_check.parse_args(["--smoke"]).parts == list(gpu_check.PARTS)
    assert gpu_check.parse_args(["--parts", "fsdp, memory"]).parts == ["fsdp", "memory"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "fsdp,nope"])


def test_a_part_past_its_time_limit_is_stopped(gpu_check, tmp_path):
    rows, error = gpu_check.run_part("memory", True, 0.5, tmp_path, tmp_path)  # importing torch alone takes longer
    assert rows == [] and error == "timed out after 0.5 s"
    assert (tmp_path / "memory.log").is_file()


def test_out_of_budget_parts_fail_with_one_line_each(tmp_path):
    """No time left: no part starts, each is one FAILED row, the exit status is 1 and the table is still written."""
    results = tmp_path / "results.md"
    proc = run_script("--smoke", "--budget", "1", "--results", str(results), tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    failed = [row for row in rows if row[0].endswith(": FAILED")]
    assert [row[0] for row in failed] == [f"{part}: FAILED" for part in ("train", "fsdp", "hellaswag", "memory")]
    assert all(row[2].startswith("not run:") for row in failed)
    assert rows[-1][0] == "wall time" and "failed: train, fsdp, hellaswag, memory" in rows[-1][2]
    assert "FAILED" in results.read_text()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """The same code paths as on a GPU, on CPU with a tiny GPT: every row, and the section in --results only."""
    results, logs = tmp_path / "results.md", tmp_path / "logs"
    official = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    args = ["--smoke", "--results", str(results), "--log-dir", str(logs)]
    proc = run_script(*args, tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert [row[0] for row in rows] == ROWS, proc.stdout
    cells = {row[0]: row[1] for row in rows}
    assert cells["FSDP, 1 device"] == "completed"
    assert float(cells["bench_train: gptlab / plain"]) > 0
    assert float(cells["HellaSwag: examples/s"]) > 0
    assert cells["command"] == f"`python scripts/gpu_check.py {' '.join(args)}`"
    section = results.read_text()
    assert section.startswith("\n## GPU check, ") and "(smoke)" in section.splitlines()[1]
    assert table_rows(section) == rows
    assert {p.name for p in logs.iterdir()} == {"train.log", "fsdp.log", "hellaswag.log", "memory.log"}
    assert (ROOT / "benchmarks" / "RESULTS.md").read_text() == official  # --smoke appends nowhere else
