"""Experiment loggers: the always-on metrics.jsonl of the run folder, plus the one `logger=` picks."""

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from gptlab.config import CsvLoggerConfig, TrainConfig, WandbLoggerConfig

METRICS_FILE = "metrics.jsonl"


class JsonlLogger(Logger):
    """One JSON object per logging call: {"step": ..., "<metric>": ...}. Easy to read back with pandas."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.path = Path(run_dir) / METRICS_FILE

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


def build_loggers(cfg: TrainConfig, run_dir: Path, run_name: str) -> list[Logger]:
    loggers: list[Logger] = [JsonlLogger(run_dir)]
    if isinstance(cfg.logger, WandbLoggerConfig):
        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),  # the offline run lands in <run>/wandb/
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                name=run_name,
                group=cfg.logger.group,
                job_type=cfg.logger.job_type,
                tags=list(cfg.tags),
                mode=cfg.logger.mode,  # passed to wandb.init; unlike offline=True it leaves WANDB_MODE alone
            )
        )
    elif isinstance(cfg.logger, CsvLoggerConfig):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
    return loggers
