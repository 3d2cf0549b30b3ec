"""The training task: validate the config, fit, and make sure summary.json says how the run ended.

The config is checked once, into a typed TrainConfig, before torch and Lightning load, so a mistake in a key is
reported in about a second; the typed config is what the module, the data and the callbacks receive.
A run that trains writes its summary.json from inside (gptlab.callbacks.summary, rank 0); this writes it for
a run that fails.
"""

import contextlib
import signal
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from gptlab.config import check_paths, load_config
from gptlab.errors import UserInputError
from gptlab.launch import run_ranks, runs_ranks_as_children
from gptlab.summary import new_summary, read_summary, write_summary
from gptlab.sweep import in_multirun


def run(cfg: DictConfig) -> dict:
    """Train one job into cfg.paths.output_dir and return its summary (as summary.json holds it).

    A failure raises, except in a multirun: there the job reports it on stderr and in its summary.json and
    returns that summary, so that the sweep goes on (gptlab.sweep counts the failures at its end)."""
    started = time.time()
    run_dir = Path(cfg.paths.output_dir)
    try:
        train_cfg, plan = load_config(cfg)  # once: what follows receives the typed config
        train_cfg = check_paths(train_cfg)  # ckpt_path: a run folder becomes its checkpoints/last.ckpt
        if runs_ranks_as_children(in_multirun(), plan.world_size):
            return _run_ranks(run_dir, train_cfg.trainer.devices)
        from gptlab.fit import fit  # Lightning takes seconds to import: only once the config is known good

        fit(train_cfg, plan, run_dir, started)  # writes summary.json (rank 0)
        _finish_wandb(exit_code=0)
        return read_summary(run_dir) or new_summary(status="completed")  # ranks > 0 have none to read
    except BaseException as e:
        summary = _failure(e) | {"seed": cfg.get("seed"), "run_dir": str(run_dir)}
        with _sigterm_ignored():  # under torchrun a peer that failed first gets this rank SIGTERMed: record first
            write_summary(run_dir, summary | {"wall_s": round(time.time() - started, 2)})
            _finish_wandb(exit_code=1)
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not in_multirun():
            raise
        if isinstance(e, UserInputError):
            print(f"{run_dir}: {e.label}: {e}", file=sys.stderr)  # one line, as a single run exits with
        else:
            print(f"{run_dir}: job failed:", file=sys.stderr)
            traceback.print_exc()  # a bug, not a config mistake: the whole traceback
        return summary


def _failure(e: BaseException) -> dict:
    """summary.json's fields for a run that ended with `e`."""
    if isinstance(e, UserInputError):  # a config mistake, bad data, a diverged run
        return new_summary(status=e.status, error=f"{e.label}: {e}")
    if isinstance(e, KeyboardInterrupt):
        return new_summary(status="interrupted")
    return new_summary(status="failed", error=f"{type(e).__name__}: {e}")


def _run_ranks(run_dir: Path, devices: int) -> dict:
    """A multirun job on several devices: its ranks run as a torchrun child, whose rank 0 writes summary.json."""
    returncode = run_ranks(run_dir, devices)
    ranks_summary = read_summary(run_dir)
    if ranks_summary is None:  # killed before rank 0 could write one
        raise RuntimeError(f"the job's ranks exited with status {returncode} and wrote no summary.json")
    if ranks_summary["status"] != "completed":
        print(f"{run_dir}: {ranks_summary['status']}: {ranks_summary.get('error')}", file=sys.stderr)
    return ranks_summary


@contextlib.contextmanager
def _sigterm_ignored():
    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not this thread's to handle
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _finish_wandb(exit_code: int) -> None:
    """End this job's wandb run, so that the next job in the same process starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)
