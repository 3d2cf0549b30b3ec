"""Train a GPT: `python scripts/train.py [group=option] [key=value] ...` (see conf/train.yaml)."""

import os
from pathlib import Path

import hydra

from gptlab.errors import exit_on_config_error, exit_on_user_error
from gptlab.train import run

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
@exit_on_user_error
def main(cfg) -> float | None:
    """Returns the final val loss: what an Optuna sweep (`hparams_search=...`) minimizes; None if the job failed."""
    return run(cfg)["val_loss"]


if __name__ == "__main__":
    main()
