"""Train a GPT: `python scripts/train.py [group=option] [key=value] ...` (see conf/train.yaml)."""

import os
import sys
from pathlib import Path

import hydra

from gptlab.errors import UserInputError
from gptlab.train import run

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg) -> None:
    try:
        run(cfg)
    except UserInputError as e:  # a mistake in the config or the data: one line, no traceback
        print(f"{e.label}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
