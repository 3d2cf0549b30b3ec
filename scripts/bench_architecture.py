"""Training speed of each architecture change (conf/arch/) and of modern_tiny, relative to GPT-2's block.

One process times forward + backward + AdamW steps of each model on the same batches, in rounds whose order
rotates, warm-up steps untimed; the table gives tokens/s and the ratio to arch=baseline of the same round
(median over rounds). The batches are random tokens with an <|endoftext|> every ~1,300 tokens on average, the
sample corpus's document length, so that document masking has boundaries to respect.

    python scripts/bench_architecture.py                                   # gpt2_tiny sizes, CPU, fp32
    python scripts/bench_architecture.py --model gpt2_124m --seq 1024 --batch 16 --device cuda --dtype bf16 --compile
"""

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gptlab.data.tokenizer import EOT
from gptlab.model import GPT
from gptlab.model_config import GPTConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
MEAN_DOCUMENT_TOKENS = 1300  # the sample corpus: ~550k tokens in ~420 documents


def model_config(model: str, change: dict) -> GPTConfig:
    """conf/model/<model>.yaml with one change applied on top, as Hydra composes `model=<model> arch=<change>`."""
    preset = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{model}.yaml")) or {}
    return GPTConfig(**{**preset, **change})


def variants(model: str) -> dict[str, GPTConfig]:
    """arch=<name> for every conf/arch/ option (baseline first), and the modern_tiny preset at the same sizes."""
    names = sorted((p.stem for p in (CONF / "arch").glob("*.yaml")), key=lambda n: (n != "baseline", n))
    configs = {name: model_config(model, OmegaConf.to_container(OmegaConf.load(CONF / "arch" / f"{name}.yaml")))
               for name in names}  # fmt: skip
    modern = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "modern_tiny.yaml"))
    sizes = {k: getattr(configs["baseline"], k) for k in ("block_size", "n_layer", "n_head", "n_embd")}
    configs["modern (all of modern_tiny)"] = GPTConfig(**{**modern, **sizes})
    return configs


def batches(n: int, batch: int, seq: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, EOT, (batch, seq + 1), generator=g)
        boundaries = torch.rand(batch, seq + 1, generator=g) < 1 / MEAN_DOCUMENT_TOKENS
        out.append(torch.where(boundaries, EOT, tokens).to(device))
    return out


def tokens_per_s(config: GPTConfig, data: list[torch.Tensor], warmup: int, args) -> float:
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(config, compile=False)).to(args.device)
    if args.compile:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]

    def step(chunk: torch.Tensor) -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for chunk in data[:warmup]:
        step(chunk)
    sync(args.device)
    start = time.perf_counter()
    for chunk in data[warmup:]:
        step(chunk)
    sync(args.device)
    return (len(data) - warmup) * data[0].size(0) * (data[0].size(1) - 1) / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_tiny", help="conf/model/<name>.yaml: the sizes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    configs = variants(args.model)
    data = batches(args.warmup + args.steps, args.batch, args.seq, args.device)
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    ratios: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no model always runs first
        measured = {name: tokens_per_s(configs[name], data, args.warmup, args) for name in order}
        for name, speed in measured.items():
            speeds[name].append(speed)
            ratios[name].append(speed / measured["baseline"])
    compiled = " compiled" if args.compile else ""
    print(f"{args.model} sizes, batch {args.batch} x seq {args.seq}, {args.device} {args.dtype}{compiled}, "
          f"torch {torch.__version__}; median of {args.rounds} rounds")  # fmt: skip
    print("\n| change | parameters | tokens/s | vs GPT-2 block |\n| --- | ---: | ---: | ---: |")
    for name, config in configs.items():
        with torch.device("meta"):
            params = GPT(config).num_params()
        print(f"| {name} | {params / 1e6:.2f}M | {statistics.median(speeds[name]):,.0f} "
              f"| {statistics.median(ratios[name]):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
