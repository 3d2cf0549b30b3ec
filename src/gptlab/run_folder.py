"""A run folder belongs to one run.

While a run trains, its folder is locked (gptlab.locks): a second run started into it fails at once, naming the
first. A fresh run is refused a folder that holds another run's results (metrics.jsonl, checkpoints/) unless it
resumes that run (ckpt_path into the folder, or auto) or `overwrite=true` asks for them to be deleted first.
Nothing is written into such a folder before the run is admitted: a resume that fails its checks leaves the folder
as it was. That includes .hydra/ (the config, Hydra's settings, the overrides), which gptlab writes itself, as
Hydra would, once the folder is the run's (conf/hydra/default.yaml: output_subdir null).

Only one process per run claims and records: rank 0, and for a multirun job on several devices the job itself
(it holds the folder for the ranks it starts, which see GPTLAB_RUN_FOLDER_HELD).
"""

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gptlab.config import CHECKPOINTS_DIR
from gptlab.errors import ConfigError
from gptlab.files import atomic_write_bytes, remove
from gptlab.launch import global_rank
from gptlab.locks import LOCK_FILE, FolderLock

# A folder holding either holds a run that trained; a summary.json alone is a run that failed before its first step.
RESULTS = ("metrics.jsonl", CHECKPOINTS_DIR)
HYDRA_RECORD = ".hydra"
HELD_BY_JOB = "GPTLAB_RUN_FOLDER_HELD"  # in the environment of the ranks a multirun job starts (gptlab.launch)


class RunFolder:
    def __init__(self, path: Path, task_cfg: DictConfig):
        self.path, self.task_cfg = Path(path), task_cfg
        self.writer = global_rank() == 0 and HELD_BY_JOB not in os.environ  # the process that claims and records
        self.held_run = self.writer and holds_run(self.path)  # another run's results, before this one wrote any
        self._lock = FolderLock(self.path, "training") if self.writer else None

    def claim(self) -> None:
        """Lock the folder (gptlab.locks.FolderInUse if another process trains in it); a new folder gets its
        .hydra/ record at once, so that a run that fails its checks still says what it was."""
        if self._lock is not None:
            self._lock.acquire()
            if not self.held_run:
                record_config(self.path, self.task_cfg)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    @property
    def records_failure(self) -> bool:
        """May a failed run's summary.json be written here (by rank 0: gptlab.summary)? Not over another run's
        results; a multirun job's ranks do write theirs, into the folder the job holds for them."""
        return not self.held_run

    def admit(self, resumes_here: bool, overwrite: bool, task_cfg: DictConfig, overrides: list[str] | None) -> None:
        """Let the run write into the folder: a new one, the run it resumes, or (overwrite) after deleting the
        results it holds. Anything else is a ConfigError, and the folder is left as it was. task_cfg, overrides:
        what .hydra/ records of the run (overrides None: this command's)."""
        if not self.held_run:
            return
        if not (resumes_here or overwrite):
            held = ", ".join(name for name in RESULTS if (self.path / name).exists())
            raise ConfigError(
                "hydra.run.dir",
                f"{self.path} holds another run's results ({held}): resume it with ckpt_path={self.path} (or "
                "ckpt_path=auto), train into a new folder, or pass overwrite=true to delete them first",
            )
        if not resumes_here:
            clear(self.path)
        self.held_run = False
        record_config(self.path, task_cfg, overrides)


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULTS)


def clear(folder: Path) -> None:
    """Delete what a run left in `folder`: all but the lock; log files (Hydra has this run's open) are emptied."""
    for path in folder.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.suffix == ".log" and path.is_file():
            os.truncate(path, 0)
        else:
            remove(path)


def record_config(folder: Path, task_cfg: DictConfig, overrides: list[str] | None = None) -> None:
    """<folder>/.hydra/: config.yaml (the composed config), hydra.yaml (Hydra's), overrides.yaml (by default this
    command's), as Hydra writes them when its output_subdir is set. Nothing outside a Hydra app (a config composed
    in a test)."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    record = {
        "config.yaml": task_cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hydra}),
        "overrides.yaml": OmegaConf.create(list(hydra.overrides.task) if overrides is None else overrides),
    }
    for name, cfg in record.items():
        atomic_write_bytes(folder / HYDRA_RECORD / name, OmegaConf.to_yaml(cfg).encode())
