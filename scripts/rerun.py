"""Re-run a run from its folder: `python scripts/rerun.py <run folder> [--strict] [key=value ...]`.

Trains again, into a new run folder, with the run's own overrides (<run>/.hydra/overrides.yaml) on today's
conf/; key=value arguments are added to them or replace the run's value of that key (`seed=1`, or
`hydra.run.dir=<folder>` for where the new run goes). The same code, config and seed give the same metrics on
CPU, bit for bit. Before training it compares the run's saved config with today's: a default changed since
is named in a warning, or an error with --strict.

The new run's provenance.json records the equivalent `python scripts/train.py ...` command.
"""

import argparse
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))

from gptlab.provenance import rerun_overrides, saved_vs_current  # noqa: E402  (after GPTLAB_ROOT is set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holds .hydra/overrides.yaml)")
    parser.add_argument("--strict", action="store_true", help="fail if today's config differs from the run's")
    args, extra = parser.parse_known_args()  # extra: overrides and Hydra flags (-m, --cfg job, ...)
    try:
        overrides = rerun_overrides(args.run_dir, [a for a in extra if not a.startswith("-")])
    except FileNotFoundError as e:
        sys.exit(f"Error: {e}")
    differences = saved_vs_current(args.run_dir, ROOT / "conf", rerun_overrides(args.run_dir))
    if differences:
        what = "\n  ".join(differences)
        print(f"{'Error' if args.strict else 'Warning'}: the config differs from the run's:\n  {what}", file=sys.stderr)
        if args.strict:
            sys.exit(2)
    print(f"Re-running {args.run_dir} with: {' '.join(overrides) or '(no overrides)'}", flush=True)
    sys.argv = [str(ROOT / "scripts" / "train.py"), *[a for a in extra if a.startswith("-")], *overrides]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
