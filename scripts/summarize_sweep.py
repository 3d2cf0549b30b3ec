"""Tables and plots of a sweep: `python scripts/summarize_sweep.py <sweep folder> [--by-seed] [--out DIR]`.

Reads every job folder's summary.json, .hydra/overrides.yaml (and config.yaml for the seed) and metrics.jsonl,
and writes into --out (default: the sweep folder) summary.md (per config, mean ± std over seeds, and per job),
summary.csv (per config), jobs.csv (per job), val_loss_curves.png and val_loss_vs_<key>.png per swept key.
--rank-by final_val_bpb (or another metric column) lists the configs best first.
A sweep of data mixtures (data.mixture) gets each source's final val loss as a column too ("val loss <source>";
summary.csv and jobs.csv also have its bpb): --rank-by final_val_loss/<source> (or final_val_bpb/<source>).
Works on a sweep still running: unfinished and failed jobs are listed with their status, left out of means.
Prints the per-config table (--by-seed: the per-job table too).
"""

import argparse
from pathlib import Path

from gptlab.errors import exit_on_user_error
from gptlab.sweep_summary import HIGHER_IS_BETTER, METRICS, load_sweep, markdown, ranked, write_summary


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder, e.g. outputs/multiruns/<date>_<time>_<uid>")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--by-seed", action="store_true", help="print the per-job table as well")
    shown.add_argument("--group-seeds", dest="by_seed", action="store_false", help="print per config (default)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    higher = ", ".join(m for m in METRICS if m in HIGHER_IS_BETTER)
    parser.add_argument("--rank-by", metavar="METRIC", default=None,
                        help=f"order configs best first by this metric's mean (default: the sweep's order): one of "
                             f"{', '.join(METRICS)}, or in a mixture final_val_loss/<source> or final_val_bpb/<source>"
                             f" (higher is better for {higher}, lower for the others)")  # fmt: skip
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.rank_by is not None:
        sweep = ranked(sweep, args.rank_by)
    written = write_summary(sweep, args.out or args.sweep)
    print(markdown(sweep, by_seed=args.by_seed))
    print("Wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
