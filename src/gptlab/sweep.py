"""Multirun plumbing: a failed job does not stop its sweep, and the sweep's exit status counts the failures.

Hydra's own behaviour is to stop: a job that raises makes the sweeper re-raise once its batch is done, so the
sweep ends with one traceback, later batches never run, and a `UserInputError` (turned into `SystemExit` by
the entry point) even ends the sweep at once. So in a multirun `gptlab.train.run` records the failure in the
job's summary.json and returns, and `SweepReport` reads every job's summary.json when the sweep ends.
"""

import json
import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

SUMMARY_FILE = "summary.json"  # each job's outcome, written by gptlab.train.run


def in_multirun() -> bool:
    """Is this process running a job of a Hydra multirun (`-m`)?"""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_overrides() -> list[str]:
    """This job's overrides: the command line's, and a sweep job's own values; [] outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def hydra_choices() -> dict[str, str]:
    """The option picked in each config group (model: gpt2_tiny, hydra/launcher: basic, ...); {} outside Hydra."""
    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def hydra_launcher() -> str | None:
    """The hydra/launcher option of this run (basic, joblib, slurm, ...); None outside Hydra."""
    return hydra_choices().get("hydra/launcher")


def job_statuses(sweep_dir: Path) -> dict[str, str]:
    """Every job folder under sweep_dir (relative path) -> its summary.json status, "missing" without one."""
    jobs = {}
    for hydra_dir in sorted(Path(sweep_dir).rglob(".hydra")):
        folder = hydra_dir.parent
        try:
            status = json.loads((folder / SUMMARY_FILE).read_text()).get("status") or "missing"
        except (OSError, ValueError):  # no summary.json: the job was killed; a cut-off file: the same
            status = "missing"
        jobs[str(folder.relative_to(sweep_dir))] = status
    return jobs


class SweepReport(Callback):
    """At the end of a multirun: `sweep: N of M jobs failed: <folders>`, the sweep's folder and the command that
    summarizes it; exit status N (capped at 125, above which shells give codes other meanings) when N > 0, so a
    script or CI sees failed sweeps."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = job_statuses(sweep_dir)
        failed = [f"{folder} ({status})" for folder, status in jobs.items() if status != "completed"]
        line = f"sweep: {len(failed)} of {len(jobs)} jobs failed"
        print(f"{line}: {', '.join(failed)}" if failed else line, file=sys.stderr if failed else sys.stdout)
        print(f"sweep folder {sweep_dir}\nsummary      python scripts/summarize_sweep.py {shlex.quote(str(sweep_dir))}")
        if failed:
            sys.exit(min(len(failed), 125))
