"""The GPT of model.py: shapes, GPT-2 parameter counts, exact gradients, and every architecture option against
its formula or reference: attention, norm position, RMSNorm, init schemes, tying, bias, dropout, label
smoothing, activation checkpointing, torch.compile through the training entry point."""

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from gptlab.config import ConfigError, load_config
from gptlab.model import GPT, NORM_EPS, GPTConfig

TINY = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def tiny(**changes) -> GPTConfig:
    return dataclasses.replace(TINY, **changes)


def batch(config: GPTConfig, B: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, config.vocab_size, (2, B, config.block_size), generator=g)
    return x, y


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


@pytest.mark.parametrize(
    "changes",
    [{}, {"norm_position": "post", "norm": "rmsnorm", "attention": "manual", "tie_embeddings": False, "bias": False}],
)
def test_gradients_match_finite_differences(changes):
    """Gradient checking: autograd equals central differences for every parameter of a float64 GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=4, **changes)).double()
    idx = torch.randint(0, 7, (2, 4))
    targets = torch.randint(0, 7, (2, 4))
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def loss_of(*values):
        return functional_call(model, dict(zip(names, values)), (idx, targets))[1]

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-6)


# --- attention ---------------------------------------------------------------------------------------------


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(d) + causal mask) v, written out here independently of model.py."""
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_equals_masked_softmax(attention):
    torch.manual_seed(0)
    model = GPT(tiny(attention=attention)).eval()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 8, TINY.n_embd)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, TINY.n_head, C // TINY.n_head).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    expected = attn.c_proj(reference_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def assert_same_outputs_and_gradients(a: GPT, b: GPT, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """Two models with the same weights give the same logits and the same gradients of the loss."""
    results = []
    for model in (a, b):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sdpa_equals_manual_attention_outputs_and_gradients():
    torch.manual_seed(0)
    sdpa = GPT(tiny(attention="sdpa"))
    manual = GPT(tiny(attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    x, y = batch(TINY)
    assert_same_outputs_and_gradients(sdpa, manual, x, y)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_is_causal(attention):
    torch.manual_seed(0)
    model = GPT(tiny(attention=attention)).eval()
    idx = torch.randint(0, TINY.vocab_size, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(idx)[0][:, :5], model(changed)[0][:, :5])


# --- normalization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_follows_its_norm_position(norm_position):
    torch.manual_seed(0)
    model = GPT(tiny(norm_position=norm_position)).eval()
    block = model.transformer.h[0]
    x = torch.randn(2, 8, TINY.n_embd)
    if norm_position == "pre":  # GPT-2: x + f(norm(x)), and a final norm
        h = x + block.attn(block.ln_1(x))
        expected = h + block.mlp(block.ln_2(h))
        assert isinstance(model.transformer.ln_f, torch.nn.LayerNorm)
    else:  # Vaswani et al.: norm(x + f(x)); the last block's norm is the final one
        h = block.ln_1(x + block.attn(x))
        expected = block.ln_2(h + block.mlp(h))
        assert isinstance(model.transformer.ln_f, torch.nn.Identity)
        assert not any("ln_f" in name for name in model.state_dict())
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_architectures_train(norm_position, norm):
    """Each architecture memorises one batch: the loss falls from log(vocab) = 4.16 to near zero."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, norm_position=norm_position,
                       norm=norm)  # fmt: skip
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x, y = batch(config, B=2)
    for _ in range(50):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 50 steps"


def test_rmsnorm_matches_its_formula():
    torch.manual_seed(0)
    model = GPT(tiny(norm="rmsnorm"))
    norms = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("ln_1", "ln_2", "ln_f")]
    assert len(norms) == 2 * TINY.n_layer + 1 and all(isinstance(m, torch.nn.RMSNorm) for m in norms)
    norm = model.transformer.h[0].ln_1
    with torch.no_grad():
        norm.weight.normal_()
    for scale in (3.0, 1e-3):  # 1e-3: mean(x^2) ~ 1e-6, where eps = 1e-5 dominates
        x = (torch.randn(2, 8, TINY.n_embd) + 1) * scale  # nonzero mean: LayerNorm would subtract it
        expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS) * norm.weight
        torch.testing.assert_close(norm(x), expected)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # a gain, no bias


# --- initialization ----------------------------------------------------------------------------------------

WIDE = GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256)  # >= 65k weights per matrix


def init_stds(init: str, C: int = WIDE.n_embd, L: int = WIDE.n_layer, std: float = 0.02) -> dict[str, float]:
    """Expected std per Linear weight (out x in): c_attn 3C x C, attn.c_proj C x C, c_fc 4C x C, mlp.c_proj C x 4C."""
    fans = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    if init == "gpt2":
        return {name: std / math.sqrt(2 * L) if name.endswith("c_proj") else std for name in fans}
    if init == "normal":
        return {name: std for name in fans}
    if init == "xavier":
        return {name: math.sqrt(2 / (fan_in + fan_out)) for name, (fan_in, fan_out) in fans.items()}
    return {name: math.sqrt(2 / fan_in) for name, (fan_in, _) in fans.items()}  # kaiming, ReLU gain, fan_in


@pytest.mark.parametrize("init", ["gpt2", "normal", "xavier", "kaiming"])
def test_init_scheme_gives_the_expected_std(init):
    torch.manual_seed(0)
    std = 0.05 if init == "normal" else 0.02  # normal follows init_std, without residual scaling
    model = GPT(dataclasses.replace(WIDE, init=init, init_std=std))
    for i, block in enumerate(model.transformer.h):
        for name, expected in init_stds(init, std=std).items():
            weight = block.get_submodule(name).weight
            assert weight.std().item() == pytest.approx(expected, rel=0.02), f"h.{i}.{name}"
            assert abs(weight.mean().item()) < 0.05 * expected
            assert torch.all(block.get_submodule(name).bias == 0)
        assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)
    for embedding in (model.transformer.wte, model.transformer.wpe):  # N(0, init_std) under every scheme
        assert embedding.weight.std().item() == pytest.approx(std, rel=0.03)


def test_untied_head_has_its_own_weight_and_init():
    torch.manual_seed(0)
    tied, untied = GPT(WIDE), GPT(dataclasses.replace(WIDE, tie_embeddings=False, init="xavier"))
    assert tied.transformer.wte.weight is tied.lm_head.weight
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert untied.num_params() == tied.num_params() + WIDE.vocab_size * WIDE.n_embd
    assert "lm_head.weight" in dict(untied.named_parameters())
    V, C = WIDE.vocab_size, WIDE.n_embd
    assert untied.lm_head.weight.std().item() == pytest.approx(math.sqrt(2 / (V + C)), rel=0.02)  # xavier
    assert untied.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    x, y = batch(WIDE, B=1)
    untied(x, y)[1].backward()
    assert not torch.equal(untied.lm_head.weight.grad, untied.transformer.wte.weight.grad)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_no_bias_option(norm):
    model = GPT(tiny(bias=False, norm=norm))
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert model.num_params() < GPT(tiny(norm=norm)).num_params()


# --- regularization ----------------------------------------------------------------------------------------


def random_sites(model: GPT) -> set[str]:
    """The places where two identical calls give different results: the embedding dropout, the attention
    weights (seen as the input of attn.c_proj), the attention branch's output given the same weights, and
    the MLP branch's output."""
    block = model.transformer.h[0]
    h = torch.randn(2, 8, TINY.n_embd)
    attn_inputs = []
    hook = block.attn.c_proj.register_forward_pre_hook(lambda module, args: attn_inputs.append(args[0]))
    attn_outputs = [block.attn(h), block.attn(h)]
    hook.remove()
    sites = {
        "embd": not torch.equal(model.transformer.drop(h), model.transformer.drop(h)),
        "attn": not torch.equal(*attn_inputs),
        "resid_attn": torch.equal(*attn_inputs) and not torch.equal(*attn_outputs),
        "resid_mlp": not torch.equal(block.mlp(h), block.mlp(h)),
    }
    return {site for site, random in sites.items() if random}


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize(
    "knob,sites",
    [("embd_dropout", {"embd"}), ("attn_dropout", {"attn"}), ("resid_dropout", {"resid_attn", "resid_mlp"})],
)
def test_each_dropout_acts_where_it_says(knob, sites, attention):
    torch.manual_seed(0)
    model = GPT(tiny(attention=attention, **{knob: 0.5}))
    assert random_sites(model.train()) == sites
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert random_sites(model) == set()
    assert torch.equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_attention_dropout_drops_attention_weights(attention):
    """softmax(q k^T / sqrt(d) + mask) times an inverted-dropout mask, then @ v: the weights are dropped, not the
    output. On CPU, sdpa draws its mask as F.dropout does, so a reseeded F.dropout reproduces it."""
    torch.manual_seed(0)
    attn = GPT(tiny(attention=attention, attn_dropout=0.3)).transformer.h[0].attn.train()
    x = torch.randn(2, 8, TINY.n_embd)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, TINY.n_head, C // TINY.n_head).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    torch.manual_seed(5)
    keep = F.dropout(torch.ones(B, TINY.n_head, T, T), p=0.3)  # 0 or 1 / (1 - p)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(C // TINY.n_head)).masked_fill(future, -math.inf)
    expected = attn.c_proj(((F.softmax(scores, dim=-1) * keep) @ v).transpose(1, 2).reshape(B, T, C))
    torch.manual_seed(5)
    torch.testing.assert_close(attn(x), expected)


def test_label_smoothing_changes_the_training_loss_only():
    torch.manual_seed(0)
    eps = 0.1
    model = GPT(tiny(label_smoothing=eps, init_std=0.5))  # confident logits: smoothing then costs something
    x, y = batch(TINY)
    logits, train_loss = model.train()(x, y)
    log_p = logits.log_softmax(-1)
    nll = -log_p.gather(-1, y.unsqueeze(-1)).mean()
    uniform = -log_p.mean()  # cross-entropy against the uniform distribution over the vocabulary
    torch.testing.assert_close(train_loss, (1 - eps) * nll + eps * uniform)  # F.cross_entropy's definition
    _, eval_loss = model.eval()(x, y)  # no dropout: the same logits
    torch.testing.assert_close(eval_loss, nll)
    assert abs(train_loss.item() - eval_loss.item()) > 1e-3


# --- activation checkpointing ------------------------------------------------------------------------------


def saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward during one forward (distinct storages, parameters excluded, counted
    with saved_tensors_hooks), and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    return sum(saved.values()), loss


def saved_bytes_and_grads(config: GPTConfig) -> tuple[int, list[torch.Tensor]]:
    """Saved bytes and gradients of a seeded forward/backward in training mode."""
    torch.manual_seed(0)
    model = GPT(config)
    x, y = batch(config, B=4)
    torch.manual_seed(1)
    nbytes, loss = saved_bytes(model, x, y)
    loss.backward()
    return nbytes, [p.grad for p in model.parameters()]


def test_activation_checkpointing_gives_identical_gradients_and_saves_less():
    dropout = dict(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)  # recomputation must replay the masks
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, **dropout)
    plain_bytes, plain_grads = saved_bytes_and_grads(config)
    ckpt_bytes, ckpt_grads = saved_bytes_and_grads(dataclasses.replace(config, activation_checkpointing=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads))
    assert ckpt_bytes < plain_bytes / 4
    # Per block, checkpointing keeps only the block's input: two more blocks, two more (B, T, C) fp32 inputs.
    deeper_bytes, _ = saved_bytes_and_grads(dataclasses.replace(config, n_layer=4, activation_checkpointing=True))
    assert deeper_bytes - ckpt_bytes == 2 * (4 * 16 * 32) * 4


def test_activation_checkpointing_only_while_training():
    """In eval mode (validation, HellaSwag) nothing is recomputed: the same saved tensors as without it."""
    torch.manual_seed(0)
    plain = GPT(TINY).eval()
    checkpointed = GPT(tiny(activation_checkpointing=True)).eval()
    checkpointed.load_state_dict(plain.state_dict())
    x, y = batch(TINY)
    (plain_bytes, plain_loss), (ckpt_bytes, ckpt_loss) = saved_bytes(plain, x, y), saved_bytes(checkpointed, x, y)
    assert ckpt_bytes == plain_bytes and torch.equal(ckpt_loss, plain_loss)
    assert saved_bytes(checkpointed.train(), x, y)[0] < plain_bytes / 2


# --- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.norm_position=middle", "model.norm_position"),
        ("model.norm=batchnorm", "model.norm"),
        ("model.init=orthogonal", "model.init"),
        ("model.attention=flash", "model.attention"),
        ("model.init_std=0", "model.init_std"),
        ("model.embd_dropout=1.0", "model.embd_dropout"),
        ("model.attn_dropout=-0.1", "model.attn_dropout"),
        ("model.resid_dropout=1.5", "model.resid_dropout"),
        ("model.label_smoothing=1.0", "model.label_smoothing"),
        ("model.compile=maybe", "model.compile"),
        ("+model.dropout=0.1", "model.dropout"),  # replaced by the three knobs above
    ],
)
def test_bad_model_options_name_their_key(override, key):
    from tests.conftest import compose_train

    with pytest.raises(ConfigError) as error:
        load_config(compose_train([override]))
    assert error.value.key == key


def test_every_model_option_composes():
    from tests.conftest import compose_train

    overrides = [
        "model.norm_position=post", "model.norm=rmsnorm", "model.init=kaiming", "model.init_std=0.01",
        "model.tie_embeddings=false", "model.bias=false", "model.attention=manual", "model.embd_dropout=0.1",
        "model.attn_dropout=0.1", "model.resid_dropout=0.1", "model.label_smoothing=0.1",
        "model.activation_checkpointing=true", "model.compile=true",
    ]  # fmt: skip
    model = load_config(compose_train(overrides))[0].model
    assert [getattr(model, o.split("=")[0].removeprefix("model.")) for o in overrides] == [
        "post", "rmsnorm", "kaiming", 0.01, False, False, "manual", 0.1, 0.1, 0.1, 0.1, True, True
    ]  # fmt: skip


# --- torch.compile -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_trains_validates_scores_hellaswag_and_samples(tmp_path, data_dir):
    """model.compile=true through the training entry point: compiled training steps, validation and HellaSwag
    (build-nanogpt's issue #79: eval broke under compile); the checkpoint keeps plain weight names, and the
    trained model samples compiled as it does eagerly. One test: inductor compiles take tens of seconds on CPU."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from gptlab.eval.hellaswag import evaluate, load_examples
    from gptlab.generate import compile_for_sampling, generate
    from gptlab.pretrained import load_model
    from gptlab.train import run
    from tests.conftest import compose_train
    from tests.test_hellaswag import make_records, write_jsonl

    hellaswag = write_jsonl(tmp_path / "hellaswag.jsonl", make_records(8))
    overrides = ["debug=smoke", "logger=none", "model.compile=true", "model.n_layer=2"]
    overrides.append(f"eval.hellaswag.path={hellaswag}")
    torch._dynamo.reset()
    counters.clear()
    summary = run(compose_train(overrides, tmp_path / "run", data_dir))
    assert summary["status"] == "completed" and summary["step"] == 2
    assert summary["val_loss"] < summary["val_loss_initial"]
    assert counters["stats"]["unique_graphs"] >= 3  # training, validation and HellaSwag each ran a compiled graph

    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])  # compiled in place: the GPT's own names
    model = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    eager = evaluate(model, load_examples(hellaswag), batch_size=32)
    assert summary["hellaswag_n"] == 8 and summary["hellaswag_acc_norm"] == eager["acc_norm"]
    assert summary["hellaswag_acc"] == eager["acc"]

    prompt = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = generate(model, prompt, 4, temperature=0)
    assert torch.equal(generate(compile_for_sampling(model), prompt, 4, temperature=0), expected)
    torch._dynamo.reset()
