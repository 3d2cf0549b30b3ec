"""Autoregressive sampling from a GPT: temperature, top-k, greedy at temperature 0.

Works with a compiled model: compile it in place with `dynamic=True` (see `compile_for_sampling`) so that
the growing context does not trigger a recompilation for every new token.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from torch.nn import functional as F

from gptlab.schema import at_least, knob, non_negative, optional, required


@dataclass
class SampleConfig:
    """The root of scripts/sample.py (conf/sample.yaml)."""

    checkpoint: Optional[str] = knob(None, required("a .ckpt file, a Hugging Face GPT-2 folder or a hub name"))
    prompt: str = ""  # empty: start from <|endoftext|>, i.e. an unconditional sample
    max_new_tokens: int = knob(100, non_negative)  # tokens generated after the prompt
    temperature: float = knob(0.8, non_negative)  # 0 = greedy; below 1 sharper, above 1 more random
    top_k: Optional[int] = knob(200, optional(at_least(1)))  # sample among the k most likely tokens; null = all
    seed: int = knob(1337, non_negative)  # same seed, same samples (0 is valid)
    num_samples: int = knob(1, at_least(1))
    stop_at_eot: bool = True  # cut each sample at the first <|endoftext|>
    compile: bool = False  # torch.compile the model (dynamic shapes: compiles once, not once per token)
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Extend the token ids idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    temperature 0 picks the most likely token (greedy); top_k keeps only the k most likely tokens.
    vocab_size limits the choice to the first vocab_size ids, e.g. 50257 to never pick a padding id.
    generator: a torch.Generator on idx's device, for reproducible samples."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        context = idx if idx.size(1) <= block_size else crop(idx, block_size)
        logits, _ = model(context)
        logits = logits[:, -1, :vocab_size].float()
        idx = torch.cat((idx, next_token(logits, temperature, top_k, generator)), dim=1)
    return idx


def greedy_text(model, prompt: str, max_new_tokens: int) -> str:
    """`prompt` and the model's greedy continuation (cut at <|endoftext|>): the sample a run's result block
    shows. Run eagerly, in eval mode (restored after): a compiled model would recompile for every length."""
    from gptlab.data.tokenizer import EOT, gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode_ordinary(prompt) or [EOT]
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            idx = torch.tensor([ids], device=next(model.parameters()).device)
            new = generate(model, idx, max_new_tokens, temperature=0, vocab_size=EOT + 1)[0, len(ids) :].tolist()
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(new[: new.index(EOT)] if EOT in new else new)


def crop(idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """The last block_size tokens (what the position embedding covers), as a fresh contiguous tensor:
    a compiled model guards on strides and views, and would recompile for a sliced view."""
    return idx[:, -block_size:].clone(memory_format=torch.contiguous_format)


def next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of logits (B, vocab): (B, 1)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def compile_for_sampling(model):
    """Compile in place (nn.Module.compile) with dynamic shapes: one graph serves every context length up to
    block_size. Returns the model."""
    model.compile(dynamic=True)
    return model
