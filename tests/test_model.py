"""The GPT of model.py: shapes, GPT-2 parameter counts, attention, init, and exact gradients."""

import math

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from gptlab.model import GPT, GPTConfig

TINY = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)


def test_output_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, TINY.vocab_size)
    assert loss.shape == () and math.isclose(loss.item(), math.log(TINY.vocab_size), rel_tol=0.1)
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, TINY.vocab_size) and loss is None


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(TINY)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "vocab_size,expected",
    [(50257, 124_439_808), (50304, 124_475_904)],  # GPT-2 124M as published; padded to a multiple of 64
)
def test_gpt2_124m_parameter_count(vocab_size, expected):
    with torch.device("meta"):  # counts without allocating 500 MB
        model = GPT(GPTConfig(vocab_size=vocab_size))
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - 1024 * 768


def test_token_embedding_is_tied_to_the_head():
    model = GPT(TINY)
    assert model.transformer.wte.weight is model.lm_head.weight


def manual_attention(q, k, v):
    """Reference: softmax(q k^T / sqrt(d) + causal mask) v, written out."""
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def test_sdpa_attention_equals_manual_masked_softmax():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 8, TINY.n_embd)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, TINY.n_head, C // TINY.n_head).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    expected = attn.c_proj(manual_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(idx)[0][:, :5], model(changed)[0][:, :5])


def test_gpt2_initialization():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.mlp.c_fc.bias == 0)


def test_dropout_is_configurable():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY.__dict__, "dropout": 0.5}))
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_no_bias_option():
    model = GPT(GPTConfig(**{**TINY.__dict__, "bias": False}))
    assert all(m.bias is None for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)))


def test_gradients_match_finite_differences():
    """Gradient checking: autograd equals central differences for every parameter of a float64 GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=4)).double()
    idx = torch.randint(0, 7, (2, 4))
    targets = torch.randint(0, 7, (2, 4))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def loss_of(*values):
        return functional_call(model, dict(zip(names, values)), (idx, targets))[1]

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-6)
