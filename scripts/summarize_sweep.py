"""Tables, plots and paired verdicts of a sweep: `python scripts/summarize_sweep.py [<sweep folder>] [options]`.

With no folder: the newest sweep under outputs/multiruns/ (the one whose folder changed last).

Reads every job folder's summary.json, .hydra/overrides.yaml (and config.yaml for the seed) and metrics.jsonl,
and writes into --out (default: the sweep folder) summary.md (per config, mean ± std over seeds, per job, and the
verdicts), summary.csv (per config), jobs.csv (per job), verdicts.csv, val_loss_curves.png and
val_loss_vs_<key>.png per swept key (mean ± 95% CI over seeds; <metric>_vs_<key>.png too for another --metric).
--rank-by final_val_bpb (or another metric column) lists the configs best first.
A sweep of data mixtures (data.mixture) gets each source's final val loss as a column too ("val loss <source>";
summary.csv and jobs.csv also have its bpb): --rank-by final_val_loss/<source> (or final_val_bpb/<source>).
Works on a sweep still running: unfinished and failed jobs are listed with their status, left out of means.
Prints the per-config table (--by-seed: the per-job table too) and the verdicts.

Verdicts: each swept key has a baseline value (--baseline KEY=VALUE, repeatable; default: the key's first value
in the order Hydra ran the jobs). Every config whose value of a key differs from its baseline is compared with
the config equal to it but for that key = baseline, seed by seed: jobs that share a seed are paired, on the seeds
completed in both (a failed or missing job drops its seed out of that pair; the line says which, and n). Each
line gives the mean paired difference Δ = config - baseline, its 95% CI, the p-value of the paired t-test
(--test wilcoxon: the Wilcoxon signed-rank test) and a verdict: better / worse (p < 0.05) or no detectable
difference. The table adds the noise floor (the baseline's std across seeds) and the smallest Δ this many seeds
can detect (power 0.8). One seed: no test is possible, and the line says so.
--metric: final_val_loss (default; val_loss), final_val_bpb (val_bpb), hellaswag_acc_norm, final_val_loss/<source>,
or any numeric summary.json key; higher is better for hellaswag_*, *acc*, tokens_per_s, samples_per_s and mfu,
lower for the others. --at-tokens N: the metric at N training tokens (from metrics.jsonl, interpolated between
the validations around N; a job that ended before N drops out) instead of at the end.

Example: python scripts/summarize_sweep.py outputs/multiruns/<sweep> --baseline scheduler=cosine --metric val_bpb
"""

import argparse
import math
from pathlib import Path

from gptlab.errors import UserInputError, exit_on_user_error
from gptlab.sweep_summary import HIGHER_IS_BETTER, METRICS, load_sweep, markdown, ranked, write_summary
from gptlab.sweep_verdicts import compare
from gptlab.verdict import TESTS

ROOT = Path(__file__).resolve().parents[1]


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Path]:
    args = parser().parse_args(argv)
    if args.sweep is None:
        args.sweep = newest_sweep(ROOT / "outputs" / "multiruns")
        print(f"The newest sweep: {args.sweep}")
    sweep = load_sweep(args.sweep)
    verdicts = compare(sweep, args.metric, dict(args.baseline), args.test, args.at_tokens)
    if args.rank_by is not None:
        sweep = ranked(sweep, args.rank_by)
    written = write_summary(sweep, args.out or args.sweep, verdicts)
    print(markdown(sweep, by_seed=args.by_seed, verdicts=verdicts))
    print("Wrote " + ", ".join(str(p) for p in written))
    return written


def newest_sweep(multiruns: Path) -> Path:
    """The sweep folder that changed last (a sweep's folder changes as each of its jobs starts)."""
    sweeps = [p for p in multiruns.iterdir() if p.is_dir()] if multiruns.is_dir() else []
    if not sweeps:
        raise UserInputError(f"no sweep in {multiruns}: give the sweep folder, summarize_sweep.py <folder>")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("sweep", type=Path, nargs="?", default=None,
                        help="a sweep folder, e.g. outputs/multiruns/<date>_<time>_<uid> (default: the newest)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--by-seed", action="store_true", help="print the per-job table as well")
    shown.add_argument("--group-seeds", dest="by_seed", action="store_false", help="print per config (default)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    higher = ", ".join(m for m in METRICS if m in HIGHER_IS_BETTER)
    parser.add_argument("--rank-by", metavar="METRIC", default=None,
                        help=f"order configs best first by this metric's mean (default: the sweep's order): one of "
                             f"{', '.join(METRICS)}, or in a mixture final_val_loss/<source> or final_val_bpb/<source>"
                             f" (higher is better for {higher}, lower for the others)")  # fmt: skip
    parser.add_argument("--metric", default="final_val_loss",
                        help="the metric of the verdicts (default: final_val_loss): final_val_loss (val_loss), "
                             "final_val_bpb (val_bpb), hellaswag_acc_norm, final_val_loss/<source>, or any numeric "
                             "key of summary.json")  # fmt: skip
    parser.add_argument("--baseline", metavar="KEY=VALUE", type=_key_value, action="append", default=[],
                        help="the baseline value of a swept key (repeatable; default: each key's first value in the "
                             "order Hydra ran the jobs)")  # fmt: skip
    parser.add_argument("--test", choices=list(TESTS), default="t",
                        help="t: paired t-test (default); wilcoxon: Wilcoxon signed-rank test")  # fmt: skip
    parser.add_argument("--at-tokens", metavar="N", type=_token_count, default=None,
                        help="compare the metric at N training tokens (e.g. 5120 or 1e9) instead of at the end; "
                             "for val loss, val bpb (per source too) and hellaswag_acc_norm")  # fmt: skip
    return parser


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, e.g. scheduler=cosine: {text!r}")
    return key, value


def _token_count(text: str) -> int:
    try:
        tokens = float(text)
    except ValueError:
        tokens = math.nan
    if not (math.isfinite(tokens) and tokens > 0 and tokens.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a positive whole number of tokens, e.g. 5120 or 1e9: {text!r}")
    return int(tokens)


if __name__ == "__main__":
    main()
