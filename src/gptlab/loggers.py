"""Experiment loggers: the always-on metrics.jsonl of the run folder, plus the one `logger=` picks.

A run resumed into its own folder continues both: metrics.jsonl is appended to, and the W&B run (its id
is kept in <run>/wandb/run_id) is resumed. A run resumed into a new folder starts a new W&B run.
"""

import json
import secrets
import string
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from gptlab.callbacks.checkpoints import checkpoint_step
from gptlab.config import TrainConfig, WandbLoggerConfig
from gptlab.files import atomic_write_bytes
from gptlab.sweep import hydra_choices, in_multirun

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = Path("wandb") / "run_id"  # in the run folder: the W&B run a resume into this folder continues


class JsonlLogger(Logger):
    """One JSON object per logging call: {"step": ..., "<metric>": ...}. Easy to read back with pandas.

    resume_step: this run resumes from a checkpoint of that step. The lines an interrupted run wrote after
    it (the resumed run logs those steps again) and a line cut short by a kill are dropped, then lines are
    appended: the file reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.is_file():
            self._rewind(resume_step)

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return ""

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        pass  # the resolved config is in .hydra/config.yaml

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    @rank_zero_only
    def _rewind(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                record = None
            if record is not None and (record.get("step") is None or record["step"] <= step):
                kept.append(line)
        atomic_write_bytes(self.path, "".join(kept).encode())


def build_loggers(cfg: TrainConfig, run_dir: Path, run_name: str) -> list[Logger]:
    """cfg.ckpt_path, when set, is a resolved checkpoint file (config.check_paths)."""
    resume_step = None if cfg.ckpt_path is None else checkpoint_step(cfg.ckpt_path)
    loggers: list[Logger] = [JsonlLogger(run_dir, resume_step)]
    if isinstance(cfg.logger, WandbLoggerConfig):
        run_id, resumed_from = _wandb_run_id(run_dir, cfg.ckpt_path)
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),  # the offline run lands in <run>/wandb/
                id=run_id,  # Lightning passes resume="allow": a known id continues that run
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=run_name,
                group=_wandb_group(cfg),
                job_type=cfg.logger.job_type,
                tags=_wandb_tags(cfg),
                mode=cfg.logger.mode,  # passed to wandb.init; unlike offline=True it leaves WANDB_MODE alone
                settings=_quiet_wandb(),
                config={"resumed_from_wandb_id": resumed_from} if resumed_from else None,
            )
        )
    return loggers


def _quiet_wandb():
    """W&B's console output off (its own log is in <run>/wandb/): the run's result block says where the run is
    and how to sync it."""
    import wandb

    settings = wandb.Settings(silent=True)
    wandb.setup(settings)  # before wandb.init: its warnings about init's own arguments come first
    return settings


def _wandb_group(cfg: TrainConfig) -> str | None:
    """logger.group, else in a multirun the sweep folder's name: a sweep's jobs side by side in the W&B UI."""
    if cfg.logger.group is not None or not in_multirun():
        return cfg.logger.group
    return Path(HydraConfig.get().sweep.dir).name


def _wandb_tags(cfg: TrainConfig) -> list[str]:
    """cfg.tags, and the experiment preset's name (`experiment=`) when there is one."""
    experiment = hydra_choices().get("experiment")
    return list(dict.fromkeys([*cfg.tags, *([experiment] if experiment else [])]))


def _wandb_run_id(run_dir: Path, ckpt_path: str | None) -> tuple[str, str | None]:
    """This run's W&B id, and the id of the run it resumes from when that is another folder's.

    Resuming into a folder that holds a W&B id continues that run; anything else starts a new one."""
    own = Path(run_dir) / WANDB_ID_FILE
    if ckpt_path is not None and own.is_file():
        return own.read_text().strip(), None
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as wandb's own
    _write_text(own, run_id + "\n")
    source = Path(ckpt_path).resolve().parent.parent / WANDB_ID_FILE if ckpt_path is not None else None
    return run_id, source.read_text().strip() if source is not None and source.is_file() else None


@rank_zero_only
def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
