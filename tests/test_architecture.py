"""The architecture options of GPTConfig, each against a reference: RoPE and partial rotary against transformers'
Llama rotary embedding, the MLPs against their formulas and Llama's SwiGLU MLP, grouped-/multi-query attention
against explicitly repeated keys and values, QK-norm against F.rms_norm / F.layer_norm per head, soft-capped
logits and z-loss against their formulas, zero-initialised residual projections, document masking against each
document run alone, and FlexAttention against the SDPA mask. Then the config rules, GPT-2's defaults unchanged,
and every option through the training entry point."""

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRotaryEmbedding, apply_rotary_pos_emb

from gptlab.config import ConfigError, load_config
from gptlab.data.tokenizer import EOT
from gptlab.model import (
    GPT,
    MLP,
    NORM_EPS,
    GPTConfig,
    apply_rope,
    document_ids,
    document_mask,
    flex_document_attention,
    rope_cos_sin,
)
from tests.conftest import compose_train
from tests.test_model import assert_same_outputs_and_gradients

TINY = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32)  # head_size 8

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def tiny(**changes) -> GPTConfig:
    return dataclasses.replace(TINY, **changes)


def tokens(config: GPTConfig, B: int = 2, T: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T or config.block_size), generator=g)


def randomize_biases_and_norms(model: torch.nn.Module) -> None:
    """Biases start at zero and norm weights at one, where a reference that forgets them still agrees."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.5 * torch.randn(bias.shape, generator=g))


# --- reference attention, written out here independently of model.py ---------------------------------------


def split_heads(attn, x: torch.Tensor, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attn.c_attn(x) -> q (B, n_head, T, hs), k and v (B, kv_heads, T, hs)."""
    B, T, C = x.shape
    kv = config.kv_heads * config.head_size
    q, k, v = attn.c_attn(x).split([C, kv, kv], dim=-1)
    return tuple(t.view(B, T, -1, config.head_size).transpose(1, 2) for t in (q, k, v))


def softmax_attention(q, k, v, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, each key/value head repeated (repeat_interleave) for its group of query
    heads. allowed: True where a query may look; causal if None."""
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    T = q.size(-2)
    if allowed is None:
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    return F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def merge_heads(attn, y: torch.Tensor) -> torch.Tensor:
    B, H, T, hs = y.shape
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, H * hs))


def attention_calls(model: GPT, idx: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model's logits and, for each block, the (input, output) of its attention during that forward."""
    calls = []

    def record(module, args, out):
        calls.append((args[0], out))

    hooks = [block.attn.register_forward_hook(record) for block in model.transformer.h]
    logits, _ = model(idx)
    for hook in hooks:
        hook.remove()
    return logits, calls


# --- RoPE --------------------------------------------------------------------------------------------------


def llama_cos_sin(dims: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRotaryEmbedding for heads of `dims` dims at positions (B, T): cos, sin (B, T, dims)."""
    config = LlamaConfig(
        hidden_size=2 * dims, num_attention_heads=2, head_dim=dims, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )  # fmt: skip
    return LlamaRotaryEmbedding(config)(torch.zeros(1), positions)


def llama_rope(q, k, dims: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's apply_rotary_pos_emb on the first `dims` dims of each head of q and k; the rest unchanged."""
    cos, sin = llama_cos_sin(dims, theta, positions)
    q_rot, k_rot = apply_rotary_pos_emb(q[..., :dims], k[..., :dims], cos, sin)
    return torch.cat((q_rot, q[..., dims:]), dim=-1), torch.cat((k_rot, k[..., dims:]), dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_llama_rotary_embedding(theta):
    """rope_cos_sin + apply_rope equal LlamaRotaryEmbedding + apply_rotary_pos_emb on random q and k (grouped k),
    at plain positions and at per-sequence ones (restarting, as document_positions makes them)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8)
    restarting = torch.tensor([list(range(16)), list(range(5)) + list(range(11))])
    for positions in (torch.arange(16).expand(2, 16), restarting, torch.randint(0, 100_000, (2, 16))):
        cos, sin = rope_cos_sin(positions, 8, theta)
        expected_cos, expected_sin = llama_cos_sin(8, theta, positions)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)  # the same float32 angles
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over the heads
        expected_q, expected_k = llama_rope(q, k, 8, theta, positions)
        torch.testing.assert_close(apply_rope(q, cos, sin), expected_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(apply_rope(k, cos, sin), expected_k, atol=1e-6, rtol=1e-6)
    # (T,) positions, as the model passes them without document_positions, broadcast over batch and heads
    cos, sin = rope_cos_sin(torch.arange(16), 8, theta)
    torch.testing.assert_close(apply_rope(q, cos, sin), llama_rope(q, k, 8, theta, torch.arange(16).expand(2, 16))[0])


def test_rope_scores_depend_only_on_relative_position():
    """q at m and k at n score as q at m + s and k at n + s (the rotation is relative), and not as k at n + 1."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        rotate = [rope_cos_sin(torch.tensor([p]), 16, 10000.0) for p in (m, n)]
        return (apply_rope(q, *rotate[0]) * apply_rope(k, *rotate[1])).sum()

    for m, n in [(0, 0), (5, 2), (3, 9), (17, 0)]:
        for shift in (1, 7, 40):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=1e-5, rtol=1e-5)
        assert abs(score(m, n + 1) - score(m, n)) > 1e-3  # the score does see the distance
    assert abs((q * k).sum() - score(4, 4)) < 1e-5  # equal positions: the plain dot product


def test_partial_rope_rotates_the_first_dims_only():
    """rope_fraction=0.5 rotates the first half of each head as a full rotary of that size (Llama's, head_dim 8)
    would, and leaves the second half unchanged; rope_dims rounds down to an even count."""
    config = GPTConfig(n_embd=32, n_head=2, position="rope", rope_fraction=0.5)
    assert config.head_size == 16 and config.rope_dims == 8
    assert dataclasses.replace(config, rope_fraction=0.3).rope_dims == 4  # 4.8 -> 4
    torch.manual_seed(0)
    x = torch.randn(2, 2, 12, 16)
    positions = torch.arange(12).expand(2, 12)
    cos, sin = rope_cos_sin(positions, config.rope_dims, config.rope_theta)
    rotated = apply_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))
    assert torch.equal(rotated[..., 8:], x[..., 8:])
    expected, _ = llama_rope(x[..., :8], x[..., :8], 8, config.rope_theta, positions)
    torch.testing.assert_close(rotated[..., :8], expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(rotated[..., :8], x[..., :8])


@pytest.mark.parametrize("rope_fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_rope_model_attention_matches_llama_reference(rope_fraction, attention):
    """Inside the GPT, each block's attention equals causal softmax attention on q and k rotated by Llama's rotary
    embedding (theta 500) on rope_dims of each head, with the block's weights. No position embedding."""
    torch.manual_seed(0)
    config = tiny(position="rope", rope_fraction=rope_fraction, rope_theta=500.0, attention=attention)
    model = GPT(config).eval()
    assert "wpe" not in model.transformer
    idx = tokens(config)
    _, calls = attention_calls(model, idx)
    positions = torch.arange(config.block_size).expand(2, -1)
    for block, (x, out) in zip(model.transformer.h, calls):
        q, k, v = split_heads(block.attn, x, config)
        q, k = llama_rope(q, k, config.rope_dims, 500.0, positions)
        torch.testing.assert_close(out, merge_heads(block.attn, softmax_attention(q, k, v)), atol=1e-5, rtol=1e-5)


# --- MLP ---------------------------------------------------------------------------------------------------


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (Hendrycks & Gimpel, 2016), the one GPT-2 was trained with."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def reference_mlp(mlp: MLP, kind: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP written out with the module's own weights."""
    up = linear(mlp.c_fc, x)
    if kind == "gelu":
        hidden = gelu_tanh(up)
    elif kind == "relu2":
        hidden = torch.clamp(up, min=0) ** 2
    else:
        gate = linear(mlp.c_gate, x)
        hidden = (gate * torch.sigmoid(gate) if kind == "swiglu" else gelu_tanh(gate)) * up
    return linear(mlp.c_proj, hidden)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["gelu", "relu2", "swiglu", "geglu"])
def test_mlp_matches_its_formula(kind, bias):
    torch.manual_seed(0)
    model = GPT(tiny(mlp=kind, bias=bias, multiple_of=16)).eval()
    randomize_biases_and_norms(model)
    mlp = model.transformer.h[0].mlp
    assert hasattr(mlp, "c_gate") == (kind in ("swiglu", "geglu"))
    x = torch.randn(2, 8, TINY.n_embd) * 2
    torch.testing.assert_close(mlp(x), reference_mlp(mlp, kind, x), atol=1e-5, rtol=1e-5)


def test_swiglu_matches_llama_mlp():
    """mlp=swiglu (no bias) equals transformers' LlamaMLP with gate_proj=c_gate, up_proj=c_fc, down_proj=c_proj."""
    torch.manual_seed(0)
    config = tiny(mlp="swiglu", bias=False, multiple_of=32)
    mlp = GPT(config).transformer.h[0].mlp.eval()
    llama = LlamaMLP(
        LlamaConfig(hidden_size=config.n_embd, intermediate_size=config.hidden_size, hidden_act="silu", mlp_bias=False)
    ).eval()
    weights = {"gate_proj": mlp.c_gate, "up_proj": mlp.c_fc, "down_proj": mlp.c_proj}
    llama.load_state_dict({f"{name}.weight": layer.weight for name, layer in weights.items()})
    x = torch.randn(2, 8, config.n_embd)
    torch.testing.assert_close(mlp(x), llama(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,n_embd,multiple_of,mlp_hidden,expected",
    [
        ("swiglu", 64, 32, None, 192),  # 8/3 * 64 = 170.7 -> 6 * 32
        ("geglu", 64, 32, None, 192),
        ("swiglu", 64, 256, None, 256),
        ("swiglu", 768, 256, None, 2048),  # Llama's rule at GPT-2 small's width
        ("gelu", 64, 32, None, 256),  # 4d
        ("relu2", 64, 32, None, 256),
        ("swiglu", 64, 32, 100, 100),  # mlp_hidden overrides
        ("relu2", 64, 32, 100, 100),
    ],
)
def test_mlp_hidden_size(kind, n_embd, multiple_of, mlp_hidden, expected):
    config = GPTConfig(n_embd=n_embd, n_head=4, mlp=kind, multiple_of=multiple_of, mlp_hidden=mlp_hidden)
    assert config.hidden_size == expected
    mlp = MLP(config)
    assert mlp.c_fc.weight.shape == (expected, n_embd) and mlp.c_proj.weight.shape == (n_embd, expected)
    if kind in ("swiglu", "geglu"):
        assert mlp.c_gate.weight.shape == (expected, n_embd)


def test_gated_mlp_has_the_ungated_parameter_count_at_gpt2_size():
    """8/3 d keeps the weights of a 4d ungated MLP: at d=768, 3 x 768 x 2048 = 2 x 768 x 3072 (no bias)."""
    gated = MLP(GPTConfig(mlp="swiglu", bias=False))
    plain = MLP(GPTConfig(mlp="gelu", bias=False))
    assert sum(p.numel() for p in gated.parameters()) == sum(p.numel() for p in plain.parameters())


# --- grouped- and multi-query attention --------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_query_attention_equals_repeated_kv(n_kv_head, attention):
    """n_kv_head key/value heads, each repeated (repeat_interleave) for its n_head / n_kv_head query heads, then
    plain causal softmax attention."""
    torch.manual_seed(0)
    config = tiny(n_kv_head=n_kv_head, attention=attention)
    attn = GPT(config).transformer.h[0].attn.eval()
    randomize_biases_and_norms(attn)
    x = torch.randn(2, 16, config.n_embd)
    q, k, v = split_heads(attn, x, config)
    assert q.shape[1] == 4 and k.shape[1] == v.shape[1] == n_kv_head
    torch.testing.assert_close(attn(x), merge_heads(attn, softmax_attention(q, k, v)), atol=1e-5, rtol=1e-5)


def test_grouped_query_sdpa_equals_manual_outputs_and_gradients():
    torch.manual_seed(0)
    sdpa = GPT(tiny(n_kv_head=2, position="rope"))
    manual = GPT(tiny(n_kv_head=2, position="rope", attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    idx, targets = tokens(TINY, seed=0), tokens(TINY, seed=1)
    assert_same_outputs_and_gradients(sdpa, manual, idx, targets)


def test_fewer_kv_heads_shrink_c_attn():
    """c_attn maps d to (n_head + 2 n_kv_head) head_size: 4 kv heads 3 x 32, 2 heads 64, 1 head 48 outputs."""
    C, hs = TINY.n_embd, TINY.head_size
    full = GPT(TINY)
    for n_kv_head, width in [(None, 3 * C), (4, 3 * C), (2, 64), (1, 48)]:
        model = GPT(tiny(n_kv_head=n_kv_head))
        attn = model.transformer.h[0].attn
        assert attn.c_attn.weight.shape == (width, C) and attn.c_attn.bias.shape == (width,)
        assert attn.c_proj.weight.shape == (C, C)
        saved = 2 * (TINY.n_head - (n_kv_head or TINY.n_head)) * hs * (C + 1)  # k and v rows, weights and bias
        assert full.num_params() - model.num_params() == TINY.n_layer * saved


# --- QK-norm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("qk_norm", ["rmsnorm", "layernorm"])
def test_qk_norm_normalizes_each_head(qk_norm, position):
    """Each block's attention equals attention on q and k normalized per head over head_size by F.rms_norm /
    F.layer_norm with the block's (randomized) norm weights, before the rotation (grouped kv heads included)."""
    torch.manual_seed(0)
    config = tiny(qk_norm=qk_norm, position=position, n_kv_head=2)
    model = GPT(config).eval()
    randomize_biases_and_norms(model)
    idx = tokens(config)
    _, calls = attention_calls(model, idx)
    for block, (x, out) in zip(model.transformer.h, calls):
        attn = block.attn
        q, k, v = split_heads(attn, x, config)
        shape = (config.head_size,)
        if qk_norm == "rmsnorm":
            assert not hasattr(attn.q_norm, "bias")
            q = F.rms_norm(q, shape, attn.q_norm.weight, eps=NORM_EPS)
            k = F.rms_norm(k, shape, attn.k_norm.weight, eps=NORM_EPS)
        else:
            q = F.layer_norm(q, shape, attn.q_norm.weight, attn.q_norm.bias, eps=NORM_EPS)
            k = F.layer_norm(k, shape, attn.k_norm.weight, attn.k_norm.bias, eps=NORM_EPS)
        if position == "rope":
            q, k = llama_rope(q, k, config.rope_dims, config.rope_theta, torch.arange(config.block_size).expand(2, -1))
        torch.testing.assert_close(out, merge_heads(attn, softmax_attention(q, k, v)), atol=1e-5, rtol=1e-5)


def test_no_qk_norm_by_default():
    names = GPT(TINY).state_dict()
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert {f"transformer.h.0.attn.{p}_norm.weight" for p in "qk"} <= GPT(tiny(qk_norm="rmsnorm")).state_dict().keys()


# --- logit soft-capping and z-loss -------------------------------------------------------------------------


def test_logit_softcap_caps_the_uncapped_logits():
    """logits = cap * tanh(z / cap) of the same weights' uncapped logits z; the loss is taken on the capped ones."""
    torch.manual_seed(0)
    cap = 2.0
    plain = GPT(tiny(init_std=0.5)).eval()  # large logits, so the cap bites
    capped = GPT(tiny(init_std=0.5, logit_softcap=cap)).eval()
    capped.load_state_dict(plain.state_dict())
    idx, targets = tokens(TINY, seed=0), tokens(TINY, seed=1)
    z, _ = plain(idx)
    assert z.abs().max() > 2 * cap
    logits, loss = capped(idx, targets)
    torch.testing.assert_close(logits, cap * torch.tanh(z / cap))
    assert logits.abs().max() < cap
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_z_loss_in_training_only():
    """Training: CE + coeff * mean(logsumexp(z)^2) over all tokens; eval: plain CE."""
    torch.manual_seed(0)
    coeff = 1e-2
    model = GPT(tiny(z_loss=coeff, init_std=0.2))
    idx, targets = tokens(TINY, seed=0), tokens(TINY, seed=1)
    logits, train_loss = model.train()(idx, targets)  # no dropout: the same logits in both modes
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    z = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(train_loss, ce + coeff * (z**2).mean())
    assert coeff * (z**2).mean() > 1e-3  # the term is not negligible
    eval_logits, eval_loss = model.eval()(idx, targets)
    torch.testing.assert_close(eval_logits, logits)
    torch.testing.assert_close(eval_loss, ce)


# --- zero-initialised residual projections -----------------------------------------------------------------


@pytest.mark.parametrize("position,mlp", [("learned", "gelu"), ("rope", "swiglu"), ("none", "relu2")])
def test_zero_init_residual_starts_every_block_as_identity(position, mlp):
    """Every attn.c_proj and mlp.c_proj weight is exactly zero, so the logits are lm_head(ln_f(embeddings));
    every other weight is the one the same seed gives without the option; the projections still get gradients."""
    config = tiny(position=position, mlp=mlp, multiple_of=16)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(config, zero_init_residual=True)).eval()
    torch.manual_seed(0)
    plain = GPT(config).eval()
    projections = [name for name in model.state_dict() if name.endswith("c_proj.weight")]
    assert len(projections) == 2 * config.n_layer
    for name, weight in model.state_dict().items():
        if name in projections:
            assert torch.all(weight == 0), name
            assert not torch.all(plain.state_dict()[name] == 0), name
        else:
            assert torch.equal(weight, plain.state_dict()[name]), name

    idx = tokens(config)
    x = model.transformer.wte(idx)
    if position == "learned":
        x = x + model.transformer.wpe(torch.arange(config.block_size))
    logits, loss = model(idx, idx)
    torch.testing.assert_close(logits, model.lm_head(model.transformer.ln_f(x)))
    loss.backward()
    for name, p in model.named_parameters():
        if name in projections:
            assert p.grad.abs().max() > 0, name


# --- document masking --------------------------------------------------------------------------------------

DOCS = GPTConfig(block_size=32, vocab_size=50304, n_layer=2, n_head=4, n_embd=32, document_mask=True)


def packed_documents(seed: int = 0) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Two packed rows of 28 tokens, three documents each, and each document's (start, end). Documents start with
    <|endoftext|> as gptlab's shards do, except row 1's first: a window that begins mid-document."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, EOT, (2, 28), generator=g)
    spans = [[(0, 7), (7, 19), (19, 28)], [(0, 10), (10, 13), (13, 28)]]
    for row, docs in enumerate(spans):
        for i, (start, _) in enumerate(docs):
            if not (row == 1 and i == 0):
                idx[row, start] = EOT
    return idx, spans


DOCUMENT_CASES = {
    "rope_document_positions": dict(position="rope", document_positions=True),
    "rope_relative": dict(position="rope"),  # rotary is relative: positions need not restart
    "nope": dict(position="none"),
    "learned_document_positions": dict(position="learned", document_positions=True),
    "gqa_qk_norm": dict(position="rope", document_positions=True, n_kv_head=2, qk_norm="rmsnorm"),
}


@pytest.mark.parametrize("case", sorted(DOCUMENT_CASES))
def test_document_mask_equals_each_document_alone(case):
    """With document_mask, the logits at each position of a packed sequence are those of its document run alone;
    without it, the 2nd and 3rd documents see the ones before them and their logits change."""
    torch.manual_seed(0)
    config = dataclasses.replace(DOCS, **DOCUMENT_CASES[case])
    model = GPT(config).eval()
    idx, spans = packed_documents()
    unmasked = GPT(dataclasses.replace(config, document_mask=False, document_positions=False)).eval()
    unmasked.load_state_dict(model.state_dict())
    with torch.no_grad():
        packed, crossing = model(idx)[0], unmasked(idx)[0]
        for row, docs in enumerate(spans):
            for i, (start, end) in enumerate(docs):
                alone = model(idx[row : row + 1, start:end])[0][0]
                tolerance = 1e-4 if case == "rope_relative" else 1e-5  # angles at larger positions round differently
                torch.testing.assert_close(packed[row, start:end], alone, atol=tolerance, rtol=tolerance)
                difference = (crossing[row, start:end] - alone).abs().max()
                assert difference > 1e-3 if i > 0 else difference < 1e-5, (row, i, difference.item())


def test_document_positions_restart_at_each_document():
    """document_positions: the position embedding is looked up at 0, 1, ... from each <|endoftext|> (from the
    row's start before the first one)."""
    idx, spans = packed_documents()
    model = GPT(dataclasses.replace(DOCS, document_positions=True))
    looked_up = []
    hook = model.transformer.wpe.register_forward_hook(lambda m, args, out: looked_up.append(args[0]))
    model(idx)
    hook.remove()
    expected = [torch.cat([torch.arange(end - start) for start, end in docs]) for docs in spans]
    assert torch.equal(looked_up[0], torch.stack(expected))


def test_document_mask_manual_equals_sdpa():
    """attention=manual and sdpa agree under the document mask: logits and gradients (GQA, rotary positions)."""
    torch.manual_seed(0)
    config = dataclasses.replace(DOCS, position="rope", document_positions=True, n_kv_head=2)
    sdpa = GPT(config)
    manual = GPT(dataclasses.replace(config, attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    idx, _ = packed_documents()
    targets = idx.roll(-1, dims=1)
    assert_same_outputs_and_gradients(sdpa, manual, idx, targets)


def test_document_mask_is_causal_and_stays_in_the_document():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = document_mask(doc)[0, 0]
    for i in range(6):
        for j in range(6):
            assert mask[i, j] == (j <= i and doc[0, i] == doc[0, j]), (i, j)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T", [28, 300])  # 300: several of FlexAttention's 128-token blocks, and a partial one
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_flex_document_attention_matches_the_sdpa_mask(n_kv_head, T):
    """flex_document_attention (the CUDA path of document_mask; eager on CPU) equals F.scaled_dot_product_attention
    with document_mask's boolean mask, on random q, k, v (grouped kv heads included)."""
    torch.manual_seed(0)
    idx = torch.randint(0, EOT, (2, T))
    idx[0, [0, 7, 19, T - 3]] = EOT
    idx[1, [10, T // 2, T // 2 + 5]] = EOT  # row 1 starts mid-document
    doc = document_ids(idx)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, n_kv_head, T, 8), torch.randn(2, n_kv_head, T, 8)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc), enable_gqa=n_kv_head != 4)
    torch.testing.assert_close(flex_document_attention(q, k, v, doc), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(softmax_attention(q, k, v, document_mask(doc)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model takes the FlexAttention path on CUDA only")
def test_model_on_cuda_with_document_mask_matches_manual():
    torch.manual_seed(0)
    config = dataclasses.replace(DOCS, position="rope", document_positions=True, n_kv_head=2)
    flex = GPT(config).cuda().eval()
    manual = GPT(dataclasses.replace(config, attention="manual")).cuda().eval()
    manual.load_state_dict(flex.state_dict())
    idx = packed_documents()[0].cuda()
    torch.testing.assert_close(flex(idx)[0], manual(idx)[0], atol=1e-4, rtol=1e-4)


# --- config rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.n_kv_head=3"], "model.n_kv_head"),  # 4 heads in groups of 3
        (["model.position=rope", "model.n_embd=36"], "model.n_embd"),  # head size 9: no pairs to rotate
        (["model.position=rope", "model.rope_fraction=0.03"], "model.rope_fraction"),  # 0.96 of 32 dims
        (["model.position=rope", "model.rope_fraction=0"], "model.rope_fraction"),
        (["model.document_positions=true"], "model.document_positions"),  # without document_mask
        (
            ["model.document_mask=true", "model.document_positions=true", "model.position=none"],
            "model.document_positions",
        ),
        (["model.mlp=unknown"], "model.mlp"),
        (["model.position=alibi"], "model.position"),
        (["model.qk_norm=batchnorm"], "model.qk_norm"),
        (["model.n_kv_head=0"], "model.n_kv_head"),
        (["model.logit_softcap=0"], "model.logit_softcap"),
        (["model.z_loss=-1e-4"], "model.z_loss"),
        (["model.rope_theta=0"], "model.rope_theta"),
        (["model.mlp_hidden=0"], "model.mlp_hidden"),
    ],
)
def test_bad_architecture_options_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(compose_train(overrides))
    assert error.value.key == key


def test_every_architecture_option_composes():
    values = {
        "position": "rope", "rope_theta": 500.0, "rope_fraction": 0.5, "mlp": "swiglu", "mlp_hidden": 96,
        "multiple_of": 32, "n_kv_head": 2, "qk_norm": "layernorm", "logit_softcap": 30.0, "z_loss": 1e-4,
        "zero_init_residual": True, "document_mask": True, "document_positions": True,
    }  # fmt: skip
    overrides = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
    model = load_config(compose_train(overrides))[0].model
    assert {k: getattr(model, k) for k in values} == values


# --- GPT-2's defaults --------------------------------------------------------------------------------------


def test_default_config_has_exactly_gpt2_weights():
    """A default GPTConfig adds nothing to GPT-2's state_dict: the same names (no norms, gates or buffers) and
    shapes as HF GPT-2 small (c_attn 3d, c_fc 4d)."""
    config = GPTConfig()
    with torch.device("meta"):
        state = GPT(config).state_dict()
    expected = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(config.n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            expected += [f"transformer.h.{i}.{module}.weight", f"transformer.h.{i}.{module}.bias"]
    expected += ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    assert list(state) == expected
    C = config.n_embd
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (3 * C, C)
    assert state["transformer.h.0.mlp.c_fc.weight"].shape == (4 * C, C)
    assert state["transformer.wpe.weight"].shape == (1024, C)


# --- every option trains -----------------------------------------------------------------------------------

FAST = [
    "debug=smoke", "logger=none", "eval.hellaswag.enabled=false", "eval.at_start=false", "max_tokens=null",
    "trainer.max_steps=2", "data.seq_len=16", "data.micro_batch_size=2", "global_batch_tokens=64",
    "eval.val_tokens=64", "model.n_layer=2", "model.n_head=4", "model.n_embd=32",
]  # fmt: skip

MODERN = [
    "model.position=rope", "model.rope_fraction=0.5", "model.norm=rmsnorm", "model.qk_norm=rmsnorm",
    "model.mlp=swiglu", "model.multiple_of=32", "model.n_kv_head=1", "model.logit_softcap=30", "model.z_loss=1e-4",
    "model.zero_init_residual=true", "model.document_mask=true", "model.document_positions=true",
    "model.bias=false", "model.tie_embeddings=false",
]  # fmt: skip

TRAINING_CASES = {
    "rope": ["model.position=rope"],
    "nope": ["model.position=none"],
    "swiglu": ["model.mlp=swiglu", "model.multiple_of=32"],
    "relu2": ["model.mlp=relu2"],
    "geglu": ["model.mlp=geglu", "model.mlp_hidden=48"],
    "mqa": ["model.n_kv_head=1"],
    "qk_norm": ["model.qk_norm=rmsnorm"],
    "softcap_z_loss": ["model.logit_softcap=30", "model.z_loss=1e-4"],
    "zero_init_residual": ["model.zero_init_residual=true"],
    "document_mask": ["model.document_mask=true", "model.document_positions=true", "model.position=rope"],
    "modern": MODERN,
    "modern_tiny": ["model=modern_tiny", "model.n_layer=2", "model.n_head=4", "model.n_embd=32"],  # the preset
}


@pytest.mark.slow  # 12 trainings: CI runs them, the fast tier leaves them out
@pytest.mark.parametrize("case", sorted(TRAINING_CASES))
def test_every_option_trains_and_reloads(case, tmp_path, data_dir):
    """2 optimizer steps through gptlab.train.run: completed, finite losses, and the last checkpoint loads with
    load_gpt into a GPT of the same config."""
    from gptlab.pretrained import load_gpt
    from gptlab.train import run

    cfg = compose_train([*FAST, *TRAINING_CASES[case]], tmp_path / "run", data_dir)
    config = load_config(cfg)[0].model
    summary = run(cfg)
    assert summary["status"] == "completed" and summary["step"] == 2
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    model = load_gpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.config == config
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    idx[0, [0, 9]] = EOT
    assert torch.isfinite(model(idx)[0]).all()


@pytest.mark.slow  # dynamo traces the whole model: ~20 s
def test_modern_options_compile_into_one_graph_without_recompiles():
    """Every option at once under torch.compile (dynamo's eager backend: the graph capture is what can break):
    one full graph, and later steps on new batches of the same shape reuse it."""
    import torch._dynamo

    torch._dynamo.reset()
    config = dataclasses.replace(
        DOCS, position="rope", rope_fraction=0.5, qk_norm="rmsnorm", mlp="swiglu", multiple_of=32, n_kv_head=2,
        logit_softcap=30.0, z_loss=1e-4, zero_init_residual=True, document_positions=True, bias=False,
        tie_embeddings=False,
    )
    model = GPT(config)
    model.compile(backend="eager", fullgraph=True)  # a graph break would raise
    with torch._dynamo.config.patch(error_on_recompile=True):  # so would a recompile
        for seed in range(3):
            idx, _ = packed_documents(seed)
            _, loss = model(idx, idx.roll(-1, dims=1))
            loss.backward()
    torch._dynamo.reset()
