"""<run>/summary.json: a run's outcome in one small file, written once by rank 0 (also when the run fails) and
read by sweeps (gptlab.sweep, gptlab.sweep_summary) and by the job that started the ranks."""

import json
import math
from pathlib import Path

from gptlab.files import atomic_write_bytes
from gptlab.launch import global_rank

SUMMARY_FILE = "summary.json"
SUMMARY_KEYS = (
    "status", "step", "tokens", "train_loss", "val_loss", "val_loss_initial", "val_bpb", "val_bpb_initial",
    "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_acc_bytes", "hellaswag_n", "harness", "data_mixture",
    "val_by_source",
    "tokens_per_s", "samples_per_s", "step_time_ms", "mfu", "wall_s", "seed", "params", "run_dir", "sample", "error",
)  # fmt: skip


def new_summary(**values) -> dict:
    """Every key, None where `values` has none; status "failed" until a run says otherwise."""
    return {key: None for key in SUMMARY_KEYS} | {"status": "failed"} | values


def write_summary(run_dir: Path, summary: dict) -> None:
    """On rank 0 only; NaN and Inf become null (JSON has neither)."""
    if global_rank() != 0:
        return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    atomic_write_bytes(Path(run_dir) / SUMMARY_FILE, (json.dumps(clean, indent=2) + "\n").encode())


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json; None where there is none (the run was killed) or it cannot be read."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
