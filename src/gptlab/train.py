"""The training task: validate the config, fit, and make sure summary.json says how the run ended.

The config is checked once, into a typed TrainConfig, before torch and Lightning load, so a mistake in a key is
reported in about a second; the typed config is what the module, the data and the callbacks receive.
Before it writes anything the run claims its folder (gptlab.run_folder: one run per folder, never another run's
results overwritten) and reads the checkpoint it resumes (gptlab.resume: which one, and whether this config may
continue it). A run that trains writes its summary.json from inside (gptlab.callbacks.summary, rank 0); this
writes it for a run that fails, where the folder is the run's own.
"""

import contextlib
import dataclasses
import signal
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from gptlab.config import load_config
from gptlab.console import say
from gptlab.errors import Preempted, UserInputError
from gptlab.launch import run_ranks, runs_ranks_as_children
from gptlab.locks import FolderInUse
from gptlab.preflight import check_run
from gptlab.report import result_block
from gptlab.resume import AUTO, config_in_place, find_resume, resumes_in
from gptlab.run_folder import RunFolder
from gptlab.summary import new_summary, read_summary, write_summary
from gptlab.sweep import in_multirun


def run(cfg: DictConfig) -> dict:
    """Train one job into cfg.paths.output_dir and return its summary (as summary.json holds it).

    A failure raises, except in a multirun: there the job reports it on stderr and in its summary.json and
    returns that summary, so that the sweep goes on (gptlab.sweep counts the failures at its end). A failure is
    recorded only in a folder that is the run's own: never over another run's results (gptlab.run_folder)."""
    started = time.time()
    folder = RunFolder(Path(cfg.paths.output_dir), cfg)
    try:
        folder.claim()  # FolderInUse while another process trains in the folder: nothing is written
    except FolderInUse as e:
        return _failed(e, cfg, folder, started, record=False)
    try:
        return _train(cfg, folder, started)
    except BaseException as e:
        # a preempted run's summary.json is written from inside, with its numbers (callbacks/summary.py)
        return _failed(e, cfg, folder, started, record=folder.records_failure and not isinstance(e, Preempted))
    finally:
        folder.release()


def _train(cfg: DictConfig, folder: RunFolder, started: float) -> dict:
    run_dir = folder.path
    cfg, overrides = config_in_place(cfg, run_dir)  # resuming in the run's folder: the run's own overrides too
    train_cfg, plan = load_config(cfg, overrides)  # once: what follows receives the typed config
    resume = find_resume(train_cfg, run_dir)  # the checkpoint ckpt_path names, and whether this config continues it
    train_cfg = dataclasses.replace(train_cfg, ckpt_path=resume.path)
    check_run(train_cfg, run_dir)  # the accelerator is here, the folder writable: before Lightning, before a step
    folder.admit(resumes_in(resume.path, run_dir), train_cfg.overwrite or cfg.ckpt_path == AUTO, cfg, overrides)
    if runs_ranks_as_children(in_multirun(), plan.world_size):
        return _run_ranks(run_dir, train_cfg.trainer.devices)
    from gptlab.fit import fit  # Lightning takes seconds to import: only once the config is known good

    fit(train_cfg, plan, run_dir, started, resume)  # writes summary.json (rank 0)
    _finish_wandb(exit_code=0)
    summary = read_summary(run_dir) or new_summary(status="completed")  # ranks > 0 have none to read
    if folder.writer and summary["status"] == "completed" and not in_multirun():
        say(result_block(summary, run_dir))  # the last screen: after W&B's own lines
    return summary


def _failed(e: BaseException, cfg: DictConfig, folder: RunFolder, started: float, record: bool) -> dict:
    """Record (where `record`) and report a run that ended with `e`; re-raise it unless this is a multirun job."""
    summary = _failure(e) | {"seed": cfg.get("seed"), "run_dir": str(folder.path)}
    with _sigterm_ignored():  # under torchrun a peer that failed first gets this rank SIGTERMed: record first
        if record:
            write_summary(folder.path, summary | {"wall_s": round(time.time() - started, 2)})
        _finish_wandb(exit_code=1)
    if summary["status"] == "interrupted":
        raise SystemExit(130) from e  # Ctrl-C: the shell's status for SIGINT, whoever caught it first
    if isinstance(e, (KeyboardInterrupt, SystemExit)) or not in_multirun():
        raise e
    if isinstance(e, UserInputError):
        print(f"{folder.path}: {e.label}: {e}", file=sys.stderr)  # one line, as a single run exits with
    else:
        print(f"{folder.path}: job failed:", file=sys.stderr)
        traceback.print_exception(e)  # a bug, not a config mistake: the whole traceback
    return summary


def _failure(e: BaseException) -> dict:
    """summary.json's fields for a run that ended with `e`."""
    if isinstance(e, UserInputError):  # a config mistake, bad data, a diverged run
        return new_summary(status=e.status, error=f"{e.label}: {e}")
    if isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):  # Lightning: exit(1)
        return new_summary(status="interrupted")
    if isinstance(e, Preempted):
        return new_summary(status="preempted", step=e.step)
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
