"""Scaling laws of a compute-matched ladder: `python scripts/fit_scaling.py <sweep folder> [--out DIR]`.

Reads every completed job of the sweep (summary.json: tokens, val_loss, seed; .hydra/config.yaml: the model, its
flops budget), fits IsoFLOP parabolas and the Chinchilla loss L(N, D) = E + A / N^alpha + B / D^beta
(gptlab/scaling.py says how), prints the report and writes scaling.md and scaling.png into --out (default: the sweep
folder). The sweep: python scripts/train.py -m experiment=scaling_ladder_cpu (or scaling_ladder on GPUs).
"""

import argparse
from pathlib import Path

from gptlab.errors import exit_on_user_error
from gptlab.scaling import BOOTSTRAP_SAMPLES, fit_ladder, markdown, plot, read_ladder


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="a sweep folder, e.g. outputs/multiruns/<date>_<time>_<uid>")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_SAMPLES,
        metavar="N",
        help=f"resamples of the seeds for the uncertainty (default {BOOTSTRAP_SAMPLES}; 0: none)",
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap: must be >= 0 (got {args.bootstrap})")
    runs, skipped = read_ladder(args.sweep)
    fit = fit_ladder(runs, args.bootstrap)
    out = args.out or args.sweep
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(fit, str(args.sweep), skipped)
    (out / "scaling.md").write_text(report)
    plot(fit).savefig(out / "scaling.png", dpi=120)
    print(report)
    written = [out / "scaling.md", out / "scaling.png"]
    print("Wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
