"""The block a training run ends with: what it reached, how fast, what its model writes, where everything is,
and the commands to run next. Made from summary.json alone, after W&B has finished, so it is the last screen."""

import shlex
from pathlib import Path


def result_block(summary: dict, run_dir: Path) -> str:
    """For a completed run. Every number is summary.json's."""
    s, run = summary, Path(run_dir)
    checkpoint = run / "checkpoints" / "last.ckpt"
    rows = [("result", _losses(s)), ("speed", _speed(s))]
    if s.get("sample"):
        sample = s["sample"].replace("\n", "⏎")
        rows.append(("sample", f'"{sample}" (greedy: an undertrained model repeats its commonest tokens)'))
    rows.append(("saved", f"{run / 'summary.json'}, {checkpoint}"))
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    if wandb_runs:
        rows.append(("W&B", f"offline; to upload: wandb sync {run / 'wandb' / 'offline-run-*'}"))
    rows += [("next", command) for command in _next_commands(run, checkpoint, s)]
    width = max(len(name) for name, _ in rows)
    lines, previous = [], None
    for name, text in rows:
        lines.append(f"  {(name if name != previous else ''):<{width}}  {text}")
        previous = name
    return "\n".join(["gptlab: done", *lines])


def _losses(s: dict) -> str:
    parts = [f"val loss {_from_to(s.get('val_loss_initial'), s.get('val_loss'))}"]
    if s.get("val_bpb") is not None:
        parts.append(f"bpb {_from_to(s.get('val_bpb_initial'), s['val_bpb'])}")
    if s.get("train_loss") is not None:
        parts.append(f"train loss {s['train_loss']:.3f}")
    text = ", ".join(parts)
    if s.get("hellaswag_acc_norm") is not None:
        text += f"; HellaSwag acc_norm {s['hellaswag_acc_norm']:.4f} on {s['hellaswag_n']:,} examples"
    return text


def _from_to(first: float | None, last: float | None) -> str:
    if last is None:
        return "not measured"
    return f"{last:.3f}" if first is None else f"{first:.3f} -> {last:.3f}"


def _speed(s: dict) -> str:
    rate = f"{s['tokens_per_s']:,.0f} tokens/s" if s.get("tokens_per_s") else "no steps timed"
    mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""
    return f"{rate}{mfu}; {s['step']:,} steps, {s['tokens']:,} tokens in {_duration(s['wall_s'])}"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


def _next_commands(run: Path, checkpoint: Path, s: dict) -> list[str]:
    ckpt, folder = shlex.quote(f"checkpoint={checkpoint}"), shlex.quote(str(run))
    more = 2 * s["tokens"] if s.get("tokens") else None
    return [
        f"python scripts/sample.py {ckpt} prompt='The'  # text from the model",
        f"python scripts/eval_hellaswag.py {ckpt}  # HellaSwag, all of it",
        f"python scripts/train.py hydra.run.dir={folder} ckpt_path={folder}"
        + (f" max_tokens={more}" if more else "")
        + "  # continue this run in its folder, its config as it was",
        f"python scripts/rerun.py {folder} seed=1  # the same run with another seed",
    ]
