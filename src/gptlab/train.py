"""The training task: validate the config, fit, and write summary.json whatever happens.

The config is checked once, into a typed TrainConfig, before torch and Lightning load, so a mistake in a key is
reported in about a second; the typed config is what the module, the data and the callbacks receive.
"""

import json
import math
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from gptlab.config import check_paths, load_config
from gptlab.data.shards import atomic_write_bytes
from gptlab.errors import UserInputError
from gptlab.launch import global_rank
from gptlab.sweep import SUMMARY_FILE, in_multirun

SUMMARY_KEYS = (
    "status", "step", "tokens", "train_loss", "val_loss", "val_loss_initial",
    "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n",
    "tokens_per_s", "samples_per_s", "step_time_ms", "mfu", "wall_s", "seed", "params", "run_dir", "error",
)  # fmt: skip


def run(cfg: DictConfig) -> dict:
    """Train one job into cfg.paths.output_dir; summary.json is written whatever happens.

    A failure raises, except in a multirun: there the job reports it on stderr and in its summary.json and
    returns that summary, so that the sweep goes on (gptlab.sweep counts the failures at its end)."""
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    summary = {key: None for key in SUMMARY_KEYS} | {"status": "failed", "seed": cfg.get("seed")}
    try:
        train_cfg, plan = load_config(cfg)  # once: what follows receives the typed config
        train_cfg = check_paths(train_cfg)  # ckpt_path: a run folder becomes its checkpoints/last.ckpt
        from gptlab.fit import fit  # Lightning takes seconds to import: only once the config is known good

        summary.update(fit(train_cfg, plan, run_dir))
        summary["status"] = "completed"
        return summary
    except UserInputError as e:  # a config mistake, bad data, a diverged run
        summary.update(status=e.status, error=f"{e.label}: {e}")
        if not in_multirun():
            raise
        print(f"{run_dir}: {e.label}: {e}", file=sys.stderr)  # one line, as a single run exits with
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        raise
    except Exception as e:
        summary["error"] = f"{type(e).__name__}: {e}"
        if not in_multirun():
            raise
        print(f"{run_dir}: job failed:", file=sys.stderr)
        traceback.print_exc()  # a bug, not a config mistake: the whole traceback
    finally:
        summary["wall_s"] = round(time.time() - started, 2)
        _write_summary(run_dir, summary)
        _finish_wandb(exit_code=0 if summary["status"] == "completed" else 1)
    return summary  # a failed job of a multirun


def _finish_wandb(exit_code: int) -> None:
    """End this job's wandb run, so that the next job in the same process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def _write_summary(run_dir: Path, summary: dict) -> None:
    if global_rank() != 0:
        return  # only rank 0 writes the summary
    run_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    atomic_write_bytes(run_dir / SUMMARY_FILE, (json.dumps(clean, indent=2) + "\n").encode())
