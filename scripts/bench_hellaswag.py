"""Benchmark HellaSwag scoring on CPU: gptlab's (gptlab.eval.hellaswag: each context once for its 4 endings,
many examples per forward pass) vs build-nanogpt's per-example loop (4 full rows per forward pass).

`python scripts/bench_hellaswag.py [--examples 300] [--batch-size 32]`: the same gpt2_tiny-sized random GPT
and the same synthetic examples (HellaSwag-like lengths) for both; prints examples/s and the speed-up, and
whether both chose the same endings (summed and per-token loss).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (gptlab)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128)).eval()  # conf/model/gpt2_tiny.yaml
    examples = synthetic_examples(args.examples)
    per_example_predictions(model, examples[:8])  # warm-up: tokenizer, allocator
    predict(model, examples[:8], batch_size=args.batch_size)
    reference, loop_s = timed(lambda: per_example_predictions(model, examples))
    batched, batched_s = timed(lambda: predict(model, examples, batch_size=args.batch_size))
    n = len(examples)
    print(f"HellaSwag scoring, {n} synthetic examples, gpt2_tiny-sized GPT, {torch.get_num_threads()} CPU threads")
    print(f"{'method':<34}{'seconds':>9}{'examples/s':>12}")
    print(f"{'per-example loop (build-nanogpt)':<34}{loop_s:>9.2f}{n / loop_s:>12.1f}")
    print(f"{f'gptlab, batch_size={args.batch_size}':<34}{batched_s:>9.2f}{n / batched_s:>12.1f}")
    print(f"speed-up {loop_s / batched_s:.2f}x; same predictions: {torch.equal(reference, batched[:, :2])}")


if __name__ == "__main__":
    main()
