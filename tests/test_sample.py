"""Sampling: greedy and top-k against hand-written loops, seeds, lengths, compiled == eager, the script."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from gptlab.config import load_config
from gptlab.generate import compile_for_sampling, generate
from gptlab.model import GPT, GPTConfig
from tests.conftest import ROOT, compose_train


def make_checkpoint(path, overrides=("model.n_layer=2",), compiled: bool = False):
    """A checkpoint laid out as scripts/train.py writes it (hyper_parameters.config + model.* weights);
    compiled: with the `_orig_mod.` names of a torch.compile'd model."""
    cfg = OmegaConf.to_container(compose_train(list(overrides)), resolve=True)
    model = GPT(load_config(cfg)[0].model)
    prefix = "model._orig_mod." if compiled else "model."
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"config": cfg}, "state_dict": state}, path)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32)).eval()


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def argmax_loop(model, idx, steps):
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def test_greedy_equals_argmax_loop_past_block_size(model):
    idx = prompt()
    out = generate(model, idx, 20, temperature=0)  # 5 + 20 > block_size 16: the context is cropped
    assert torch.equal(out, argmax_loop(model, idx, 20))


def test_top_k_1_is_greedy(model):
    idx = prompt()
    assert torch.equal(generate(model, idx, 8, temperature=1.3, top_k=1), generate(model, idx, 8, temperature=0))


def test_seed_and_length(model):
    idx = prompt(batch=3)
    samples = [generate(model, idx, 10, top_k=20, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert samples[0].shape == (3, 15)
    assert torch.equal(samples[0][:, :5], idx)
    assert torch.equal(samples[0], samples[1])
    assert not torch.equal(samples[0], samples[2])


def test_top_k_and_vocab_limit(model):
    """Every sampled token is among the k most likely ones, and below vocab_size."""
    idx = prompt(batch=4, length=6)
    out = generate(model, idx, 1, top_k=3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top3 = model(idx)[0][:, -1].topk(3).indices
    assert all(token in row for token, row in zip(out[:, -1].tolist(), top3.tolist()))
    limited = generate(model, idx, 30, temperature=2.0, generator=torch.Generator().manual_seed(0), vocab_size=50)
    assert limited[:, 6:].max() < 50


@pytest.mark.slow
def test_compiled_equals_eager(model):
    """One compiled graph with dynamic shapes serves the growing context (no recompilation per token)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = compile_for_sampling(model)
    idx = prompt(length=3)
    eager = generate(model, idx, 17, temperature=0)
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        assert torch.equal(generate(compiled, idx, 17, temperature=0), eager)
    torch._dynamo.reset()


@pytest.mark.slow
def test_sample_script(tmp_path):
    make_checkpoint(tmp_path / "last.ckpt", compiled=True)  # saved from a torch.compile'd model
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sample.py"), f"checkpoint={tmp_path / 'last.ckpt'}",
         "prompt=Once upon a time", "max_new_tokens=12", "num_samples=2", "stop_at_eot=false"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    samples = [s.strip() for s in result.stdout.split("-" * 40) if s.strip()]
    assert len(samples) == 2
    assert all(s.startswith("Once upon a time") and len(s) > len("Once upon a time") for s in samples)
