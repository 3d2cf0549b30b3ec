"""Draw every learning-rate schedule in conf/scheduler/ into one PNG:
`python scripts/plot_schedules.py [--steps N] [--out schedules.png] [override ...]`.

Each option is composed as `python scripts/train.py scheduler=<option> <override ...>` would compose it, and
its LR is read from the scheduler the trainer builds, stepped once per optimizer step. --steps sets the run
length (default: the run's own budget, max_tokens / global_batch_tokens); overrides apply to every option,
e.g. `scheduler.warmup_steps=100 optimizer.lr=1e-3 model=gpt2_124m`.
"""

import argparse
import dataclasses
import math
import os
import textwrap
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import open_dict

from gptlab.config import ConfigError, load_config
from gptlab.errors import composition_error, exit_on_user_error
from gptlab.schedules import build_scheduler

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the run's own)")
    parser.add_argument("--out", type=Path, default=Path("schedules.png"), help="the PNG to write")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every option")
    args = parser.parse_args(argv)
    options = sorted(p.stem for p in (CONF / "scheduler").glob("*.yaml"))
    curves = {name: lr_curve(name, args.steps, args.overrides) for name in options}
    plot(curves, args.out)
    print(f"Wrote {len(curves)} schedules to {args.out.resolve()}")
    return args.out


def lr_curve(option: str, steps: int | None, overrides: list[str]) -> tuple[list[float], str]:
    """The LR of each optimizer step of a run with scheduler=<option>, and a label of its knobs."""
    length = [] if steps is None else ["max_tokens=null", f"trainer.max_steps={steps}"]
    cfg, plan = load_config(compose_train([f"scheduler={option}", *length, *overrides]))
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    scheduler = build_scheduler(optimizer, cfg.scheduler, plan.total_steps, cfg.model.n_embd)
    lrs = []
    for _ in range(plan.total_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    knobs = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.scheduler).items() if k != "name")
    return lrs, option + "\n" + textwrap.fill(knobs, width=60)


def compose_train(overrides: list[str]):
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose(config_name="train", overrides=overrides)
    except HydraException as e:
        raise composition_error(e) or ConfigError("command line", str(e).strip().splitlines()[0]) from None
    with open_dict(cfg):
        cfg.paths.output_dir = "."  # set by Hydra at run time; nothing is written there
    return cfg


def plot(curves: dict[str, tuple[list[float], str]], out: Path) -> None:
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    FigureCanvasAgg(fig)  # the Agg backend: a PNG file, no display and no pyplot state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (lrs, label) in zip(axes.flat, curves.values()):
        ax.plot(range(len(lrs)), lrs)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("lr", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(bottom=0)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
