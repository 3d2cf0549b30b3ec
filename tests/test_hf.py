"""Hugging Face interop: GPT-2 import and export, Llama export: same logits both ways, padded vocabulary, which
architecture an export picks and what it refuses, the export script."""

import subprocess
import sys

import pytest
import torch

from gptlab.errors import DataError
from gptlab.hf import GPT2_VOCAB_SIZE, export_hf, export_target, gpt_from_hf_model, import_hf_gpt2
from gptlab.model import GPT, GPTConfig
from gptlab.pretrained import load_model
from tests.conftest import ROOT
from tests.test_sample import make_checkpoint

transformers = pytest.importorskip("transformers")


def tiny_hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(n: int = 24) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB_SIZE, (2, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(hf_model, idx):
    return hf_model(idx).logits


@torch.no_grad()
def gptlab_logits(model, idx):
    return model(idx)[0]


def test_import_in_memory_same_logits():
    hf_model, idx = tiny_hf_gpt2(), tokens()
    model = gpt_from_hf_model(hf_model)
    assert model.config.vocab_size == GPT2_VOCAB_SIZE and model.config.block_size == 64
    c = model.config  # GPT-2's architecture, whatever a training config's defaults might be
    assert (c.norm_position, c.norm, c.tie_embeddings, c.bias) == ("pre", "layernorm", True, True)
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(gptlab_logits(model, idx), hf_logits(hf_model, idx), atol=1e-5, rtol=0)


def test_import_padded_vocab_keeps_real_logits():
    hf_model, idx = tiny_hf_gpt2(), tokens()
    model = gpt_from_hf_model(hf_model, vocab_size=50304)
    logits = gptlab_logits(model, idx)
    assert logits.shape[-1] == 50304
    torch.testing.assert_close(logits[..., :GPT2_VOCAB_SIZE], hf_logits(hf_model, idx), atol=1e-5, rtol=0)
    assert torch.all(model.transformer.wte.weight[GPT2_VOCAB_SIZE:] == 0)
    with pytest.raises(DataError, match="smaller"):
        gpt_from_hf_model(hf_model, vocab_size=1000)


def test_import_from_folder_and_load_model(tmp_path):
    hf_model, idx = tiny_hf_gpt2(), tokens()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    expected = hf_logits(hf_model, idx)
    for model in (import_hf_gpt2(str(tmp_path)), load_model(tmp_path)):
        torch.testing.assert_close(gptlab_logits(model, idx), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mlp_hidden", [None, 48])  # 48: not GPT-2's 4d, exported as n_inner
def test_export_reloads_in_transformers(tmp_path, mlp_hidden):
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, mlp_hidden=mlp_hidden)
    model = GPT(config).eval()
    idx = tokens()
    assert export_target(model.config) == "GPT2LMHeadModel"
    export_hf(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.vocab_size == GPT2_VOCAB_SIZE
    expected = gptlab_logits(model, idx)[..., :GPT2_VOCAB_SIZE]  # padded rows dropped
    torch.testing.assert_close(hf_logits(hf_model, idx), expected, atol=1e-5, rtol=0)


def test_export_manual_attention_and_dropouts(tmp_path):
    """Manual attention is the same function as sdpa: it exports; the three dropouts map to HF's pdrops."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32, attention="manual",
                       embd_dropout=0.1, attn_dropout=0.2, resid_dropout=0.3)  # fmt: skip
    model = GPT(config).eval()
    export_hf(model, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    c = hf_model.config
    assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == (0.1, 0.2, 0.3)
    idx = tokens()
    expected = gptlab_logits(model, idx)[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(hf_logits(hf_model, idx), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "setting",
    [{"norm_position": "post"}, {"norm": "rmsnorm"}, {"tie_embeddings": False}, {"bias": False},
     {"position": "rope"}, {"mlp": "swiglu"}, {"n_kv_head": 1}, {"qk_norm": "layernorm"}],
)
def test_export_refuses_what_gpt2_cannot_express(tmp_path, setting):
    """A GPT-2 with one setting changed is neither a GPT-2 nor a Llama: the error names that setting."""
    (key, value), = setting.items()
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16, **setting))
    with pytest.raises(DataError, match=f"model.{key}={value}"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)  # what maps a GPT to HF Llama


def tiny_llama_gpt(**overrides) -> GPT:
    """A Llama-mappable gptlab GPT (grouped-query: 2 key/value heads for 4 query heads), in eval mode, with random
    norm weights and biases: at their init (one, zero) a weight put in the wrong place could go unnoticed."""
    torch.manual_seed(0)
    settings = dict(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, **LLAMA)
    model = GPT(GPTConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 1:
                weight.add_(0.1 * torch.randn_like(weight))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        # gelu-gated MLP of a given width, biases, multi-query, another RoPE base, the written-out attention
        {"mlp": "geglu", "mlp_hidden": 96, "bias": True, "n_kv_head": 1, "rope_theta": 500.0, "attention": "manual"},
    ],
    ids=["tied", "untied", "variants"],
)
def test_export_llama_same_logits(tmp_path, overrides):
    model = tiny_llama_gpt(**overrides)
    c = model.config
    assert export_target(c) == "LlamaForCausalLM"
    export_hf(model, tmp_path)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf = hf_model.config
    assert hf.architectures == ["LlamaForCausalLM"] and hf.vocab_size == GPT2_VOCAB_SIZE
    assert (hf.num_key_value_heads, hf.intermediate_size, hf.max_position_embeddings) == (c.kv_heads, c.hidden_size, 64)
    assert (hf.rms_norm_eps, hf.rope_parameters["rope_theta"]) == (1e-5, c.rope_theta)
    assert hf.bos_token_id == hf.eos_token_id == GPT2_VOCAB_SIZE - 1  # <|endoftext|>
    assert hf.tie_word_embeddings == c.tie_embeddings
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == c.tie_embeddings
    idx = tokens(64)  # the whole block: every position's rotation
    expected = gptlab_logits(model, idx)[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(hf_logits(hf_model, idx), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "setting, key",
    [
        ({"qk_norm": "rmsnorm"}, "qk_norm"),
        ({"logit_softcap": 30.0}, "logit_softcap"),
        ({"document_mask": True}, "document_mask"),
        ({"document_mask": True, "document_positions": True}, "document_mask"),  # the first of the two
        ({"norm_position": "post"}, "norm_position"),
        ({"position": "none"}, "position"),
        ({"position": "learned"}, "position"),
        ({"rope_fraction": 0.5}, "rope_fraction"),
        ({"mlp": "relu2"}, "mlp"),
        ({"mlp": "gelu"}, "mlp"),
        ({"norm": "layernorm"}, "norm"),
    ],
)
def test_export_refuses_what_llama_cannot_express(tmp_path, setting, key):
    """A Llama-mappable GPT with one setting changed: a one-line error naming the setting, and no folder."""
    model = tiny_llama_gpt(**setting)
    with pytest.raises(DataError, match=f"model.{key}={setting[key]}") as error:
        export_hf(model, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_refusal_messages():
    neither = "cannot export model.qk_norm=rmsnorm: neither Hugging Face GPT-2 nor Llama has QK-norm"
    with pytest.raises(DataError, match=f"^{neither}$"):
        export_target(GPTConfig(n_embd=64, n_head=4, qk_norm="rmsnorm", **LLAMA))
    # each setting has an equivalent, but not all in the same target: one from each
    mixed = "model.norm=rmsnorm rules out Hugging Face GPT-2 .* model.position=learned rules out Llama"
    with pytest.raises(DataError, match=mixed):
        export_target(GPTConfig(norm="rmsnorm"))


def test_refusals(tmp_path):
    small_vocab = GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(DataError, match="smaller"):
        export_hf(small_vocab, tmp_path / "out")
    with pytest.raises(DataError, match="config.json"):
        import_hf_gpt2(str(tmp_path))
    transformers.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(DataError, match="not 'gpt2'"):
        import_hf_gpt2(str(tmp_path))
    relu = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, activation_function="relu")
    with pytest.raises(DataError, match="activation_function"):
        gpt_from_hf_model(transformers.GPT2LMHeadModel(relu))
    untied = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, tie_word_embeddings=False)
    with pytest.raises(DataError, match="not tied"):
        gpt_from_hf_model(transformers.GPT2LMHeadModel(untied))


LLAMA_OVERRIDES = (*(f"model.{key}={str(value).lower()}" for key, value in LLAMA.items()), "model.n_kv_head=4")


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, target", [((), "GPT2LMHeadModel"), (LLAMA_OVERRIDES, "LlamaForCausalLM")], ids=["gpt2", "llama"]
)
def test_export_script(tmp_path, overrides, target):
    model = make_checkpoint(tmp_path / "last.ckpt", ("model.n_layer=2", *overrides))
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_hf.py"), f"checkpoint={tmp_path / 'last.ckpt'}", f"out={out}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"as a Hugging Face {target}" in result.stdout
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == target
    idx = tokens(16)
    expected = gptlab_logits(model, idx)[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(hf_logits(hf_model, idx), expected, atol=1e-5, rtol=0)
    assert not (tmp_path / "outputs").exists()  # no run folder
