"""Benchmark HellaSwag scoring on CPU: gptlab's (gptlab.eval.hellaswag: each context once for its 4 endings,
many examples per forward pass) vs build-nanogpt's per-example loop (4 full rows per forward pass).

`python scripts/bench_hellaswag.py [--examples 300] [--batch-size 32]`: the same gpt2_tiny-sized random GPT
and the same synthetic examples (HellaSwag-like lengths) for both; prints examples/s and the speed-up, and
whether both chose the same endings (summed and per-token loss). On a GPU, the full split with GPT-2 124M:
`python scripts/bench_hellaswag.py --examples 10042 --model gpt2_124m --device cuda --dtype bf16 --compile
--batch-size 128 --no-loop`.
"""

import argparse
import random
import time

import torch
from torch.nn import functional as F

from gptlab.data.tokenizer import gpt2_tokenizer
from gptlab.eval.hellaswag import Example, predict
from gptlab.model import GPT, GPTConfig

WORDS = "the a man woman dog ball kitchen runs jumps slowly quickly into out of table chair paints is then".split()


def synthetic_examples(n: int, seed: int = 0) -> list[Example]:
    """Contexts of 10-60 words and endings of 5-25, about the spread of the real validation split."""
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [
        Example(sentence(rng.randint(10, 60)), tuple(sentence(rng.randint(5, 25)) for _ in range(4)), rng.randrange(4))
        for _ in range(n)
    ]


@torch.no_grad()
def per_example_predictions(model: GPT, examples: list[Example]) -> torch.Tensor:
    """build-nanogpt's loop: one forward pass of 4 rows per example."""
    enc = gpt2_tokenizer()
    predictions = []
    for example in examples:
        ctx = enc.encode_ordinary(example.ctx)
        ends = [enc.encode_ordinary(" " + ending) for ending in example.endings]
        tokens = torch.zeros(4, max(len(ctx) + len(end) for end in ends), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, end in enumerate(ends):
            tokens[i, : len(ctx) + len(end)] = torch.tensor(ctx + end)
            mask[i, len(ctx) : len(ctx) + len(end)] = 1
        logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        summed = (losses * mask[:, 1:]).sum(1)
        predictions.append([summed.argmin().item(), (summed / mask[:, 1:].sum(1)).argmin().item()])
    return torch.tensor(predictions)


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


MODELS = {  # conf/model/<name>.yaml sizes: random weights (the speed does not depend on them)
    "gpt2_tiny": dict(block_size=256, n_layer=4, n_head=4, n_embd=128),
    "gpt2_124m": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="10042: the size of the validation split")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (gptlab)")
    parser.add_argument("--model", choices=list(MODELS), default="gpt2_tiny")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype of gptlab's scorer")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (gptlab's scorer)")
    parser.add_argument("--no-loop", action="store_true", help="time gptlab's scorer alone (the loop takes long)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model])).to(args.device).eval()
    examples = synthetic_examples(args.examples)
    score = lambda: predict(  # noqa: E731
        model, examples, batch_size=args.batch_size, device=args.device, autocast_dtype=DTYPES[args.dtype]
    )
    where = f"{torch.get_num_threads()} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"HellaSwag scoring, {len(examples)} synthetic examples, {args.model}-sized GPT, {where}, torch "
          f"{torch.__version__}, {args.dtype}{', compiled' if args.compile else ''}")  # fmt: skip
    print(f"{'method':<34}{'seconds':>9}{'examples/s':>12}")
    if not args.no_loop:
        per_example_predictions(model, examples[:8])  # warm-up: tokenizer, allocator
        reference, loop_s = timed(lambda: per_example_predictions(model, examples))
        report("per-example loop (build-nanogpt)", loop_s, len(examples))
    if args.compile:
        model.compile()
        _, warm_s = timed(score)  # compiles a shape per length bucket
        report("gptlab, first pass (compiling)", warm_s, len(examples))
    else:
        predict(model, examples[:8], batch_size=args.batch_size, device=args.device)  # warm-up
    batched, batched_s = timed(lambda: sync(args.device, score()))
    report(f"gptlab, batch_size={args.batch_size}", batched_s, len(examples))
    if not args.no_loop:
        print(f"speed-up {loop_s / batched_s:.2f}x; same predictions: {torch.equal(reference, batched[:, :2])}")


def report(method: str, seconds: float, n: int) -> None:
    print(f"{method:<34}{seconds:>9.2f}{n / seconds:>12.1f}")


def sync(device: str, result):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result


if __name__ == "__main__":
    main()
