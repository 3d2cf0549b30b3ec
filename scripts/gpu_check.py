"""One prepared GPU check, sized for one device call of at most 8 minutes on an H100 / H200:

    python scripts/gpu_check.py            # GPT-2 124M on the GPU; appends a dated section to benchmarks/RESULTS.md
    python scripts/gpu_check.py --smoke    # the same code paths on CPU with a tiny GPT (about a minute, CI)

Four parts, each in its own process with its own time limit (a crash, a hang or an out-of-memory in one does not
stop the others), each reusing the benchmark script that owns the measurement:
  train      scripts/bench_train.py: gptlab's training path vs the plain PyTorch loop (bf16, torch.compile),
             tokens/s, their ratio and MFU (gptlab.flops);
  fsdp       scripts/train.py distributed=fsdp trainer.devices=1 for a few steps: completed?, tokens/s, MFU;
  hellaswag  gptlab.eval.hellaswag on 10,042 synthetic examples written in the real file's schema (the device
             machine has no network for the real one): examples/s and wall time;
  memory     scripts/bench_memory.py: peak memory of a forward + backward with and without activation checkpointing.
Prints one markdown table; a part that failed is one line of it, and the exit status is then 1.
How to run it on the device machine (the wheels to carry): benchmarks/README.md.
"""

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# bench_train's documented GPU shape: 131,072 tokens per step = 16 x 1024 x 8 accumulation steps
GPT2_124M = [
    "model=gpt2_124m", "data.seq_len=1024", "data.micro_batch_size=16", "global_batch_tokens=131072",
    "precision=bf16", "model.compile=true",
]  # fmt: skip
TINY = [  # seconds per step on a CPU; no compile (inductor's C++ build alone takes minutes there)
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "data.seq_len=64", "data.micro_batch_size=4",
    "global_batch_tokens=512", "trainer.accelerator=cpu",
]  # fmt: skip
TINY_MODEL = ["n_layer=2", "n_head=2", "n_embd=32"]

# Per part: its settings and its time limit in seconds. Full: estimates for an H100, where the first compile of the
# 124M model takes about a minute; they add up to the default --budget, which leaves 30 s of the 8 minutes spare.
SETTINGS = {
    "full": dict(
        train=dict(overrides=GPT2_124M, steps=10, rounds=2, warmup=3, timeout=250),  # 4 runs, each compiles
        fsdp=dict(overrides=GPT2_124M, steps=12, log_every=2, val_tokens=16384, timeout=100),
        hellaswag=dict(model="gpt2_124m", sizes={}, examples=10_042, batch_size=128, dtype="bf16", timeout=50),
        memory=dict(model="gpt2_124m", overrides=[], batch=16, seq=1024, precision="bf16", repeats=3, timeout=50),
        budget=450,
    ),
    "smoke": dict(
        train=dict(overrides=TINY, steps=2, rounds=1, warmup=1, timeout=120),
        fsdp=dict(overrides=TINY, steps=4, log_every=1, val_tokens=256, timeout=120),
        hellaswag=dict(model="gpt2_tiny", sizes=dict(n_layer=2, n_head=2, n_embd=32), examples=32, batch_size=16,
                       dtype="fp32", timeout=120),
        memory=dict(model="gpt2_tiny", overrides=TINY_MODEL, batch=2, seq=32, precision="fp32", repeats=1, timeout=120),
        budget=480,
    ),
}
PARTS = ("train", "fsdp", "hellaswag", "memory")
MIN_PART_S = 15  # a part given less than this is not started


def script(name: str):
    """A module of scripts/ (bench_train, bench_memory, ...), imported so its functions do the measuring."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module(name)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"


def mfu_note(tokens_per_s: float, model_cfg, seq_len: int, precision: str, device: str) -> tuple[str, str]:
    """(MFU in %, how it was counted) with gptlab.flops; n/a where the device's peak is unknown (CPUs)."""
    from gptlab.flops import flops_per_token, gpu_label, mfu, peak_flops

    per_token, peak = flops_per_token(model_cfg, seq_len), peak_flops(device, precision)
    if peak is None:
        return "n/a", f"no peak FLOP/s known for {device}"
    how = f"6N+12LHQT, {per_token / 1e6:,.0f} MFLOPs/token; {gpu_label(device)} {precision} {peak / 1e12:g} TFLOP/s"
    return f"{100 * mfu(tokens_per_s, per_token, peak):.1f}", how


# ---------------------------------------------------------------------------------------------------------
# The parts: each returns rows (measurement, value, unit / notes) and runs in a process of its own


def part_train(s: dict) -> list[tuple]:
    from gptlab.config import load_config
    from gptlab.flops import precision_kind

    bench = script("bench_train")
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        cfg = bench.compose_config(s["overrides"], s["warmup"] + s["steps"], Path(tmp))
        device = bench.train_device(cfg)
        print(bench.describe(cfg, s["overrides"], device), flush=True)
        rounds = bench.run_rounds(cfg, device, s["steps"], s["rounds"], s["warmup"], Path(tmp))
    train_cfg, plan = load_config(cfg)
    gptlab, plain = (statistics.median(column) for column in zip(*rounds))
    ratio = statistics.median(g / p for g, p in rounds)
    precision = precision_kind(train_cfg.precision.trainer_precision, train_cfg.precision.matmul_precision)
    m, d = train_cfg.model, train_cfg.data
    shape = (
        f"{m.n_layer} layers, d={m.n_embd}, {d.micro_batch_size} x {d.seq_len} x {plan.grad_accum} micro-steps, "
        f"{train_cfg.precision.name}, compile {m.compile}"
    )
    how = f"median of {s['rounds']} rounds x {s['steps']} steps after {s['warmup']} warm-up (ab, ba)"
    rows = [
        ("bench_train: gptlab", f"{gptlab:,.0f}", f"tokens/s; {shape}; {how}"),
        ("bench_train: plain PyTorch loop", f"{plain:,.0f}", "tokens/s; same model, batches, optimizer, schedule"),
        ("bench_train: gptlab / plain", f"{ratio:.3f}", "median of the per-round ratios; target >= 0.95"),
    ]
    for name, tokens_per_s in (("gptlab", gptlab), ("plain", plain)):
        value, note = mfu_note(tokens_per_s, train_cfg.model, train_cfg.data.seq_len, precision, device_name())
        rows.append((f"bench_train: MFU {name}", value, f"%; {note}"))
    return rows


def fsdp_overrides(s: dict) -> list[str]:
    """train.py's arguments: FSDP on one device, `steps` steps, one validation at the end, no W&B or HellaSwag."""
    steps = s["steps"]
    return [*s["overrides"], "distributed=fsdp", "trainer.devices=1", "logger=none", "max_tokens=null",
            f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={s['log_every']}", "eval.at_start=false",
            f"eval.every_n_steps={steps}", f"eval.val_tokens={s['val_tokens']}", "eval.hellaswag.enabled=false",
            "callbacks.progress_bar_refresh_rate=0", f"callbacks.checkpoint.every_n_steps={steps}"]  # fmt: skip


def part_fsdp(s: dict) -> list[tuple]:
    """scripts/train.py itself (Hydra, Lightning's ModelParallelStrategy, FSDP2) in a subprocess; summary.json's
    tokens/s and MFU are medians over logging intervals, the first (compilation) left out."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_fsdp_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={run_dir}", *fsdp_overrides(s)]
        print(shlex.join(cmd), flush=True)
        code = subprocess.run(cmd, cwd=tmp).returncode
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if code != 0 or summary.get("status") != "completed":
        raise RuntimeError(f"train.py exited {code}, summary status {summary.get('status')}: {summary.get('error')}")
    mfu = summary.get("mfu")
    return [
        ("FSDP, 1 device", "completed", f"{summary['step']} steps in {summary['wall_s']:.0f} s (start-up included)"),
        ("FSDP: tokens/s", f"{summary['tokens_per_s']:,.0f}", f"tokens/s; median over {s['log_every']}-step intervals, "
         f"the first left out; MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}"),
    ]  # fmt: skip


def synthetic_hellaswag(n: int = 10_042, seed: int = 0) -> list[dict]:
    """n records in the schema of HellaSwag's hellaswag_val.jsonl, with bench_hellaswag's texts of HellaSwag-like
    lengths: the real file needs the network. About a third WikiHow, half zero-shot, as in the real split."""
    records = []
    for i, example in enumerate(script("bench_hellaswag").synthetic_examples(n, seed)):
        words = example.ctx.split()
        ctx_a, ctx_b = " ".join(words[:-2]).capitalize() + ".", " ".join(words[-2:])  # ctx_b starts the sentence
        wikihow = i % 3 == 2
        records.append(dict(
            ind=i, activity_label=" ".join(words[:2]).capitalize(), ctx_a=ctx_a, ctx_b=ctx_b, ctx=f"{ctx_a} {ctx_b}",
            split="val", split_type="zeroshot" if i % 2 else "indomain", label=example.label,
            endings=list(example.endings), source_id=f"wikihow~{i}" if wikihow else f"activitynet~v_{i:011d}",
        ))  # fmt: skip
    return records


def part_hellaswag(s: dict) -> list[tuple]:
    """Wall time of what eval_hellaswag.py does after loading the model: read the file, tokenize, score."""
    from gptlab.eval.hellaswag import evaluate, load_examples
    from gptlab.model import GPT, GPTConfig

    bench = script("bench_hellaswag")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = GPTConfig(**{**bench.MODELS[s["model"]], **s["sizes"]})
    model = GPT(config).to(device).eval()
    score = dict(batch_size=s["batch_size"], device=device, autocast_dtype=bench.DTYPES[s["dtype"]])
    with tempfile.TemporaryDirectory(prefix="gpu_check_hellaswag_") as tmp:
        path = Path(tmp) / "hellaswag_val.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in synthetic_hellaswag(s["examples"])))
        evaluate(model, load_examples(path)[:8], **score)  # warm-up: CUDA context, kernels, tokenizer
        started = time.perf_counter()
        result = evaluate(model, load_examples(path), **score)
        seconds = time.perf_counter() - started  # evaluate's counts are host numbers: the GPU has finished
    how = f"{config.n_layer} layers, d={config.n_embd}, random weights, batch {s['batch_size']}, {s['dtype']}, eager"
    return [
        ("HellaSwag: examples/s", f"{result['n'] / seconds:,.0f}", f"examples/s; {how}"),
        ("HellaSwag: wall time", f"{seconds:.2f}", f"s for {result['n']:,} synthetic examples (read, tokenize, "
         f"score); acc_norm {result['acc_norm']:.3f} (chance: 0.25)"),
    ]  # fmt: skip


def part_memory(s: dict) -> list[tuple]:
    bench = script("bench_memory")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = bench.model_config(s["model"], s["overrides"])
    setup = f"{s['model']}, batch {s['batch']} x {s['seq']}, {s['precision']}, forward + backward (no optimizer), eager"
    unit = "MiB, torch.cuda.max_memory_allocated" if device == "cuda" else "MiB (CPU: the profiler's allocations)"
    rows, above = [], {}
    for checkpointing in (False, True):
        mode = dataclasses.replace(config, activation_checkpointing=checkpointing, compile=False)
        r = bench.measure(mode, s["batch"], s["seq"], device, s["precision"], s["repeats"])
        above[checkpointing] = r["peak"]  # above the weights
        # measure() reset the peak before its step, so on CUDA this is the mode's own peak, weights included
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else r["peak"]
        note = f"{unit}; {r['peak'] / bench.MB:,.1f} MiB above the weights; step {r['seconds']:.3f} s"
        rows.append((f"peak memory, activation checkpointing {'on' if checkpointing else 'off'}",
                     f"{peak / bench.MB:,.1f}", note))  # fmt: skip
    saved = 1 - above[True] / above[False]
    rows.append(("activation checkpointing saves", f"{100 * saved:.0f}", f"% of the peak above the weights; {setup}"))
    return rows


PART_FUNCTIONS = dict(train=part_train, fsdp=part_fsdp, hellaswag=part_hellaswag, memory=part_memory)


# ---------------------------------------------------------------------------------------------------------
# Running the parts and writing the table


def run_part(name: str, smoke: bool, timeout: float, log_dir: Path, tmp: Path) -> tuple[list[tuple], str | None]:
    """(rows, None) or ([], why it failed). The part runs as `gpu_check.py --part NAME` in a new process group,
    so that a timeout also ends what it started (train.py, compile workers). Its output goes to log_dir/NAME.log."""
    rows_file, log = tmp / f"{name}.json", log_dir / f"{name}.log"
    cmd = [sys.executable, __file__, "--part", name, "--rows", str(rows_file), *(["--smoke"] if smoke else [])]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            return [], f"timed out after {timeout:g} s"
    if code != 0 or not rows_file.is_file():
        return [], f"exit {code}: {last_line(log)}"
    return [tuple(row) for row in json.loads(rows_file.read_text())], None


def stop(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:200].replace("|", "/")


def markdown(rows: list[tuple]) -> str:
    lines = ["| measurement | value | unit / notes |", "| --- | ---: | --- |"]
    return "\n".join(lines + [f"| {m} | {v} | {n} |" for m, v, n in rows])


def append_section(path: Path, title: str, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n{table}\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny GPT, few steps and examples (CI)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--results", type=Path, help="append the table here (default: benchmarks/RESULTS.md, "
                        "but nowhere with --smoke)")  # fmt: skip
    parser.add_argument("--no-results", action="store_true", help="append nowhere")
    parser.add_argument("--budget", type=float, help="seconds for all parts (default: 450; 480 with --smoke)")
    parser.add_argument("--log-dir", type=Path, help="keep each part's log here (default: a temp folder)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def check(args: argparse.Namespace, log_dir: Path, tmp: Path) -> tuple[list[tuple], list[str]]:
    """Every part within the budget: (rows, names of the parts that failed)."""
    settings = SETTINGS["smoke" if args.smoke else "full"]
    deadline = time.perf_counter() + (args.budget or settings["budget"])
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join(["python", "scripts/gpu_check.py", *sys.argv[1:]])
    rows = [
        ("device", device_name(), f"CUDA {torch.version.cuda}" if torch.cuda.is_available() else "no GPU"),
        ("torch", torch.__version__, f"Python {platform.python_version()}"),
        ("command", f"`{command}`", "scripts/gpu_check.py; benchmarks/README.md says how to run it"),
    ]
    failed = []
    for name in args.parts:
        left = deadline - time.perf_counter()
        timeout = int(min(settings[name]["timeout"], left))
        started = time.perf_counter()
        if timeout < MIN_PART_S:
            part_rows, error = [], f"not run: {max(left, 0):.0f} s of the budget left"
        else:
            print(f"gpu_check: {name} (at most {timeout:.0f} s) ...", flush=True)
            part_rows, error = run_part(name, args.smoke, timeout, log_dir, tmp)
        if error:
            failed.append(name)
            part_rows = [(f"{name}: FAILED", "-", error)]
            log = log_dir / f"{name}.log"
            if log.is_file():
                print(f"--- last lines of {name}'s log ---\n" + "\n".join(log.read_text().splitlines()[-30:]))
        print(f"gpu_check: {name} {'FAILED' if error else 'done'} in {time.perf_counter() - started:.0f} s", flush=True)
        rows += part_rows
    return rows, failed


def main() -> None:
    os.environ.setdefault("GPTLAB_ROOT", str(ROOT))  # the parts and train.py inherit both
    os.environ.setdefault("WANDB_MODE", "disabled")
    args = parse_args()
    if args.part:  # a child: measure one part, write its rows
        rows = PART_FUNCTIONS[args.part](SETTINGS["smoke" if args.smoke else "full"][args.part])
        args.rows.write_text(json.dumps(rows))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        log_dir = (args.log_dir or Path(tmp)).resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        rows, failed = check(args, log_dir, Path(tmp))
    wall = f"{time.perf_counter() - started:.0f}"
    rows.append(("wall time", wall, f"s, all parts; failed: {', '.join(failed) or 'none'}"))
    table = markdown(rows)
    print("\n" + table)
    results = None if args.no_results else args.results or (None if args.smoke else RESULTS)
    if results:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        append_section(results, f"GPU check, {stamp}: {device_name()}{' (smoke)' if args.smoke else ''}", table)
        print(f"\nappended to {results}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
