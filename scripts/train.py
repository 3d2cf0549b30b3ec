"""Train a GPT: `python scripts/train.py [group=option] [key=value] ...` (see conf/train.yaml)."""

import os
import sys
from pathlib import Path

import hydra

from gptlab.config import ConfigError
from gptlab.train import run

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg) -> None:
    try:
        run(cfg)
    except ConfigError as e:  # a user mistake: one line, no traceback
        print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
