"""AdamW parameter groups and the cosine schedule."""

import math

import pytest
import torch

from gptlab.config import AdamWConfig, CosineConfig
from gptlab.model import GPT, GPTConfig
from gptlab.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups

TINY = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)


def ids(params):
    return {id(p) for p in params}


def test_weight_decay_applies_to_exactly_the_2d_weights():
    model = GPT(TINY)
    decay, no_decay = param_groups(model, weight_decay=0.1, decay_embeddings=True)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    assert ids(decay["params"]) == ids(matrices) and decay["weight_decay"] == 0.1
    assert ids(no_decay["params"]) == ids(vectors) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied weight once


def test_embeddings_can_be_left_undecayed():
    model = GPT(TINY)
    decay, no_decay = param_groups(model, weight_decay=0.1, decay_embeddings=False)
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert embeddings <= ids(no_decay["params"]) and not embeddings & ids(decay["params"])
    assert id(model.transformer.h[0].attn.c_attn.weight) in ids(decay["params"])


def test_adamw_decay_is_decoupled():
    """With a zero gradient, AdamW shrinks a decayed weight by lr * wd and leaves an undecayed one alone."""
    model = GPT(TINY)
    opt = build_optimizer(model, AdamWConfig(lr=0.1, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    w, b = model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.bias
    with torch.no_grad():
        b.fill_(1.0)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w, before_w * (1 - 0.1 * 0.5))
    torch.testing.assert_close(b, before_b)


def test_cosine_schedule_shape():
    f = lr_multiplier(CosineConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_scheduler_steps_the_optimizer_lr():
    model = GPT(TINY)
    opt = build_optimizer(model, AdamWConfig(lr=1e-3))
    sched = build_scheduler(opt, CosineConfig(warmup_steps=4, min_lr_ratio=0.0), total_steps=8)
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[6] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert lrs[8] == pytest.approx(0.0)
