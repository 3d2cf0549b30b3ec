"""What Lightning and Hydra cost: `python scripts/bench_train.py [steps=20] [rounds=3] [warmup=3] [overrides]`.

In one process, alternating round by round and swapping which goes first (to cancel the drift of a shared or
warming machine), it times `steps` optimizer steps of
  (a) gptlab: GPTModule + the Lightning Trainer and callbacks exactly as gptlab.fit builds them, the real
      TokenDataModule, the config composed by Hydra from conf/train.yaml and the overrides given here;
  (b) plain: a minimal PyTorch loop over the same gptlab.model.GPT, the same micro-batches in the same order,
      gradient accumulation, precision (autocast), compile setting, optimizer, LR schedule and clipping.
The first `warmup` steps of each run (allocator, kernels, compilation) are not timed; the timed window of
gptlab lies inside trainer.fit (a callback reads the clock), so Trainer start-up, the validation after the
last step and the final checkpoint are outside it. Validation, HellaSwag, W&B and the progress bar are off.
Prints tokens/s of both per round, their ratio, and the median ratio.

CPU (default): gpt2_tiny, fp32. GPU: `model=gpt2_124m data.seq_len=1024 data.micro_batch_size=16
global_batch_tokens=131072 precision=bf16 model.compile=true`.
"""

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from gptlab.config import load_config  # noqa: E402
from gptlab.data.datamodule import TokenDataModule  # noqa: E402
from gptlab.fit import build_callbacks, build_trainer  # noqa: E402
from gptlab.loggers import build_loggers  # noqa: E402
from gptlab.model import GPT  # noqa: E402
from gptlab.module import GPTModule  # noqa: E402
from gptlab.schedules import build_scheduler  # noqa: E402

BENCH_KEYS = {"steps": 20, "rounds": 3, "warmup": 3}  # the benchmark's own arguments; the rest go to Hydra


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    bench, overrides = dict(BENCH_KEYS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in bench:
            bench[key] = int(value)
        else:
            overrides.append(arg)
    return bench, overrides


def compose_config(overrides: list[str], total_steps: int, run_dir: Path):
    """The user's config, with everything that is not a training step switched off."""
    quiet = [
        "logger=none",  # metrics.jsonl only: no W&B
        "max_tokens=null",
        f"trainer.max_steps={total_steps}",
        f"eval.every_n_steps={total_steps}",  # one validation, after the last (untimed) step
        "eval.at_start=false",
        "eval.hellaswag.enabled=false",
        "callbacks.progress_bar_refresh_rate=0",
        f"callbacks.checkpoint.every_n_steps={total_steps}",  # only the final save, outside the timed window
        f"paths.output_dir={run_dir}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *quiet])
    cfg.eval.val_tokens = cfg.data.seq_len  # one validation window: the run must validate once at its end
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(L.Callback):
    """perf_counter at the end of optimizer steps `start` and `stop` (after the other callbacks' work)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop, self.times = start, stop, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in (self.start, self.stop) and step not in self.times:  # the first micro-batch after the update
            sync(pl_module.device)
            self.times[step] = time.perf_counter()

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return (self.stop - self.start) * tokens_per_step / (self.times[self.stop] - self.times[self.start])


def run_gptlab(cfg, warmup: int, steps: int, run_dir: Path) -> float:
    """gptlab.fit's path, minus provenance and the header: tokens/s over steps warmup..warmup+steps."""
    train_cfg, plan = load_config(cfg)
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(train_cfg.precision.matmul_precision)
    module = GPTModule(train_cfg, plan)
    datamodule = TokenDataModule(train_cfg.data, train_cfg.eval, plan, train_cfg.seed)
    callbacks = build_callbacks(train_cfg, plan, run_dir)
    clock = StepClock(warmup, warmup + steps)
    loggers = build_loggers(train_cfg, run_dir, run_name="bench_train")
    trainer = build_trainer(train_cfg, plan, run_dir, loggers, [*callbacks, clock])
    trainer.fit(module, datamodule=datamodule)
    return clock.tokens_per_s(plan.tokens_per_step)


def train_batches(train_cfg, plan, device: torch.device):
    """The dataset of micro-batches the datamodule gives rank 0 of one process: item i is micro-batch i."""
    datamodule = TokenDataModule(train_cfg.data, train_cfg.eval, plan, train_cfg.seed)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.trainer = SimpleNamespace(  # what train_dataloader reads of a Trainer
        global_rank=0, world_size=1, global_step=0, strategy=SimpleNamespace(root_device=device)
    )
    return datamodule.train_dataloader().dataset


def run_plain(cfg, warmup: int, steps: int, device: torch.device) -> float:
    """nanoGPT's loop over the same model, batches, precision, optimizer, schedule and clipping."""
    train_cfg, plan = load_config(cfg)
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(train_cfg.precision.matmul_precision)
    flag = train_cfg.precision.trainer_precision
    model = GPT(train_cfg.model).to(device, dtype=torch.bfloat16 if flag == "bf16-true" else None)
    if train_cfg.model.compile:
        model.compile()
    optimizer = train_cfg.optimizer.build(model)
    scheduler = build_scheduler(optimizer, train_cfg.scheduler, plan.total_steps, train_cfg.model.n_embd)
    amp_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(flag)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=flag == "16-mixed")
    batches, accum = train_batches(train_cfg, plan, device), plan.grad_accum
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        for micro in range(accum):
            x, y = batches[step * accum + micro]
            if device.type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            with amp:
                _, loss = model(x, y)
            scaler.scale(loss / accum).backward()
        scaler.unscale_(optimizer)
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * plan.tokens_per_step / (time.perf_counter() - started)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def describe(cfg, overrides: list[str], device: torch.device) -> str:
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    model = next((o.partition("=")[2] for o in overrides if o.startswith("model=")), "gpt2_tiny")
    return (
        f"{hardware}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, lightning {L.__version__}\n"
        f"model {model}: n_layer={cfg.model.n_layer} n_embd={cfg.model.n_embd} vocab={cfg.model.vocab_size}, "
        f"micro-batch {cfg.data.micro_batch_size} x seq {cfg.data.seq_len}, global_batch_tokens "
        f"{cfg.global_batch_tokens}, precision {cfg.precision.name}, compile {cfg.model.compile}"
    )


def train_device(cfg) -> torch.device:
    accelerator = cfg.trainer.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if on_gpu else "cpu")


def run_rounds(cfg, device: torch.device, steps: int, rounds: int, warmup: int, tmp: Path) -> list[tuple[float, float]]:
    """(gptlab, plain) tokens/s of each round; scripts/gpu_check.py calls this too."""
    rows = []
    for r in range(rounds):
        run_dir = tmp / f"round{r}"
        if r % 2 == 0:  # ab, ba, ab, ...: the one that runs second is not always the same
            gptlab, plain = run_gptlab(cfg, warmup, steps, run_dir), run_plain(cfg, warmup, steps, device)
        else:
            plain, gptlab = run_plain(cfg, warmup, steps, device), run_gptlab(cfg, warmup, steps, run_dir)
        rows.append((gptlab, plain))
        print(f"round {r}: gptlab {gptlab:,.0f} tokens/s, plain {plain:,.0f} tokens/s, ratio {gptlab / plain:.3f}",
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    bench, overrides = parse_args(sys.argv[1:])
    steps, rounds, warmup = bench["steps"], bench["rounds"], bench["warmup"]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cfg = compose_config(overrides, warmup + steps, Path(tmp))
        device = train_device(cfg)
        print(describe(cfg, overrides, device))
        print(f"overrides: {' '.join(overrides) or '(none)'}; {rounds} rounds x {steps} timed steps "
              f"(after {warmup} warm-up steps), gptlab and plain alternating (ab, ba, ...)", flush=True)  # fmt: skip
        rows = run_rounds(cfg, device, steps, rounds, warmup, Path(tmp))
    print(f"\n{'round':>5} {'gptlab tok/s':>13} {'plain tok/s':>12} {'ratio':>6}")
    for r, (gptlab, plain) in enumerate(rows):
        print(f"{r:>5} {gptlab:>13,.0f} {plain:>12,.0f} {gptlab / plain:>6.3f}")
    ratio = statistics.median(g / p for g, p in rows)
    gptlab, plain = (statistics.median(column) for column in zip(*rows))
    print(f"median ratio gptlab / plain: {ratio:.3f} (medians: gptlab {gptlab:,.0f}, plain {plain:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
