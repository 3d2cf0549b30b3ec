"""Hugging Face interop: GPT-2 import and export, Llama export: same logits both ways, padded vocabulary, which
architecture an export picks and what it refuses, the export script; the export's tokenizer (tiktoken's ids, built
offline) and its log-probabilities (gptlab's)."""

import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptlab.data.tokenizer import EOT, gpt2_tokenizer
from gptlab.errors import ConfigError, DataError
from gptlab.hf import (
    GPT2_VOCAB_SIZE,
    ExportHFConfig,
    export_hf,
    export_target,
    gpt2_hf_tokenizer,
    gpt_from_hf_model,
    import_hf_gpt2,
    save_tokenizer,
)
from gptlab.model import GPT, GPTConfig
from gptlab.pretrained import load_model
from gptlab.schema import load
from tests.conftest import ROOT, compose_root
from tests.test_sample import make_checkpoint

transformers = pytest.importorskip("transformers")


EXPORT_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


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
    assert {p.name for p in tmp_path.iterdir()} == EXPORT_FILES
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert hf_model.config.vocab_size == 50304  # padded rows kept
    torch.testing.assert_close(hf_logits(hf_model, idx), gptlab_logits(model, idx), atol=1e-5, rtol=0)


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
    torch.testing.assert_close(hf_logits(hf_model, idx), gptlab_logits(model, idx), atol=1e-5, rtol=0)


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
    assert hf.architectures == ["LlamaForCausalLM"] and hf.vocab_size == c.vocab_size
    assert (hf.num_key_value_heads, hf.intermediate_size, hf.max_position_embeddings) == (c.kv_heads, c.hidden_size, 64)
    assert (hf.rms_norm_eps, hf.rope_parameters["rope_theta"]) == (1e-5, c.rope_theta)
    assert hf.bos_token_id == hf.eos_token_id == GPT2_VOCAB_SIZE - 1  # <|endoftext|>
    assert hf.tie_word_embeddings == c.tie_embeddings
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == c.tie_embeddings
    idx = tokens(64)  # the whole block: every position's rotation
    torch.testing.assert_close(hf_logits(hf_model, idx), gptlab_logits(model, idx), atol=1e-5, rtol=0)


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
    with pytest.raises(DataError, match="smaller than GPT-2's"):
        export_hf(small_vocab, tmp_path / "out")
    padded = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    for vocab_size in (1000, 50305):
        with pytest.raises(DataError, match=f"vocab_size must be 50257 .* to 50304 .* not {vocab_size}"):
            export_hf(padded, tmp_path / "out", vocab_size=vocab_size)
    assert not (tmp_path / "out").exists()
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
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == target
    idx = tokens(16)
    torch.testing.assert_close(hf_logits(hf_model, idx), gptlab_logits(model, idx), atol=1e-5, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("Hello world") == [15496, 995]
    assert not (tmp_path / "outputs").exists()  # no run folder


# The export's tokenizer: tiktoken's ids, built offline


@pytest.fixture
def offline(monkeypatch):
    """The Hub's offline switch on, and any network connection attempted (even one a library would catch and
    forgive) fails the test."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read from the env at import
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"no network in this test: connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield
    assert not attempts, f"network connections attempted: {attempts}"


TOKENIZER_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "a  b   c    d", "   ", " leading", "trailing   ", "\n", "\n\n\n", "\r\n\r\n", "line\nline\n\nend\n",
    "\ttab\t\ttabs \t mixed\t\n", "\x0b\x0c vertical tab, form feed", "a\u00a0b\u2003c\u3000d\u2028e\u200bf",
    "0 1 12 123 1234 12345 1234567890 3.14159 -2e-8 1,000,000 0x1F 2024-01-01 ١٢٣ ⅷ ²",
    "It's we'll they've I'd don't she's you're IT'S y'all ''quoted'' 'tis 's 've",
    "!!! ?!... ---- (a) [b] {c} <d> @#$%^&* ~`|\\/ ;: «» „“ ‘’ — – …",
    "😀 🤖🚀 👍🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ ✨✨",
    "日本語のテキスト、中文文本。한국어 텍스트 ｆｕｌｌｗｉｄｔｈ",
    "naïve café Ångström façade São Paulo Zürich Łódź İstanbul ß ﬁ",
    "e\u0301 a\u0308 n\u0303 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇ \u0301 leading combining mark",
    "שלום עולם مرحبا بالعالم \u200f\u200e سلام",
    "Ελληνικά русский текст हिन्दी ภาษาไทย ქართული",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
    "<|endoftext", "endoftext|>", "<|", "|>", "",
]


def random_char(rng: random.Random, end: int) -> str:
    while True:
        code = rng.randrange(end)
        if not 0xD800 <= code < 0xE000:  # surrogates are no characters
            return chr(code)


def random_texts(per_alphabet: int = 50) -> list[str]:
    """Seeded random strings from alphabets that stress the regex (whitespace, letters, marks, digits) and BPE."""
    rng = random.Random(0)
    alphabets = [
        lambda: chr(rng.randrange(0x20, 0x7F)),  # printable ASCII
        lambda: rng.choice(" \t\n\r\x0b\x0c\x85\xa0\u2000\u2028\u3000\u200bab1.'"),  # whitespace runs between words
        lambda: chr(rng.randrange(0xA0, 0x370)),  # accented letters and combining marks
        lambda: chr(rng.randrange(0x1F300, 0x1FB00)),  # emoji
        lambda: random_char(rng, 0x10000),  # the BMP
        lambda: random_char(rng, 0x110000),  # any code point
    ]
    return ["".join(draw() for _ in range(rng.randrange(1, 60))) for draw in alphabets for _ in range(per_alphabet)]


def test_hf_tokenizer_same_ids_as_tiktoken(tmp_path, tiktoken_gpt2, sample_docs, offline):
    """AutoTokenizer on the written tokenizer gives the ids of gptlab's tokenizer and of tiktoken's own gpt2, and
    decodes them back to the text."""
    save_tokenizer(gpt2_hf_tokenizer(block_size=64), tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == GPT2_VOCAB_SIZE and tokenizer.model_max_length == 64
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == EOT
    texts = TOKENIZER_TEXTS + random_texts() + [text for _, text in sample_docs[::40]]
    ids = tokenizer(texts)["input_ids"]  # no BOS or EOS added
    for text, hf_ids in zip(texts, ids):
        assert hf_ids == gpt2_tokenizer().encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text), repr(text)
        assert tokenizer.decode(hf_ids) == text, repr(text)


def test_hf_tokenizer_special_token(tmp_path, tiktoken_gpt2, offline):
    """HF's convention: `<|endoftext|>` in a text is the special token (tiktoken's allowed_special="all");
    split_special_tokens=True spells it out as encode_ordinary does (how gptlab's shards read a text)."""
    save_tokenizer(gpt2_hf_tokenizer(block_size=64), tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "The end.<|endoftext|>A new document<|endoftext|>"
    ids = tokenizer.encode(text)
    assert ids.count(EOT) == 2 and ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The end.A new document"
    assert tokenizer.encode(text, split_special_tokens=True) == tiktoken_gpt2.encode_ordinary(text)
    assert EOT not in tokenizer.encode(text, split_special_tokens=True)


# The export's log-probabilities: gptlab's


def tiny_gpt2() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=-1)


EXPORTS = {"gpt2": tiny_gpt2, "llama": tiny_llama_gpt}


@pytest.mark.parametrize("architecture", EXPORTS)
def test_export_log_probs_equal_gptlab(tmp_path, architecture):
    """The padded rows are kept: the softmax normalizer, so every log-probability, is gptlab's."""
    model = EXPORTS[architecture]()
    export_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf_model.config.vocab_size == 50304
    idx = tokens(64)
    difference = log_probs(hf_logits(hf_model, idx)) - log_probs(gptlab_logits(model, idx))
    assert difference.abs().max() <= 1e-5


@pytest.mark.parametrize("architecture", EXPORTS)
def test_export_gpt2_vocab_drops_padded_rows(tmp_path, architecture):
    """vocab_size=50257, the old export: the real tokens' logits are the same, their log-probabilities shift."""
    model = EXPORTS[architecture]()
    export_hf(model, tmp_path, vocab_size=GPT2_VOCAB_SIZE)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf_model.config.vocab_size == GPT2_VOCAB_SIZE and hf_model.generation_config.suppress_tokens is None
    idx = tokens()
    expected = gptlab_logits(model, idx)[..., :GPT2_VOCAB_SIZE]
    torch.testing.assert_close(hf_logits(hf_model, idx), expected, atol=1e-5, rtol=0)
    shift = log_probs(hf_logits(hf_model, idx)) - log_probs(gptlab_logits(model, idx))[..., :GPT2_VOCAB_SIZE]
    assert shift.abs().min() > 1e-5


def test_export_config_vocab_size():
    def vocab_size(*overrides):
        return load(ExportHFConfig, compose_root("export_hf", ["checkpoint=x.ckpt", "out=y", *overrides])).vocab_size

    assert vocab_size() is None  # the model's
    assert vocab_size("vocab_size=50257") == GPT2_VOCAB_SIZE
    with pytest.raises(ConfigError, match="vocab_size"):
        vocab_size("vocab_size=1000")  # fewer ids than the tokenizer's


def test_export_generation_never_samples_padded_ids(tmp_path):
    """Padded rows made to win every argmax: generate, with the export's generation_config, still never picks one."""
    model = tiny_gpt2()
    with torch.no_grad():  # tied head: padded ids score h . w with |w| large; one of each +-w pair scores high
        w = 100 * torch.randn(24, model.config.n_embd, generator=torch.Generator().manual_seed(2))
        model.transformer.wte.weight[GPT2_VOCAB_SIZE:] = torch.cat([w, -w])[:47]
    export_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = hf_model.generation_config
    assert config.suppress_tokens == list(range(GPT2_VOCAB_SIZE, 50304))
    assert config.bos_token_id == config.eos_token_id == EOT
    idx = tokens(8)
    assert torch.all(hf_logits(hf_model, idx)[:, -1].argmax(-1) >= GPT2_VOCAB_SIZE)  # what the suppression stops
    for do_sample in (False, True):
        out = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=8, do_sample=do_sample,
                                pad_token_id=EOT)  # fmt: skip
        assert torch.all(out[:, idx.shape[1] :] < GPT2_VOCAB_SIZE)


def test_export_round_trips_through_import(tmp_path):
    """import_hf_gpt2 reads an export (padded vocabulary included) back to the same GPT."""
    model = tiny_gpt2()
    export_hf(model, tmp_path)
    for imported in (import_hf_gpt2(str(tmp_path)), load_model(tmp_path)):
        assert imported.config.vocab_size == 50304
        idx = tokens()
        torch.testing.assert_close(gptlab_logits(imported, idx), gptlab_logits(model, idx), atol=1e-5, rtol=0)


TEXT = "It's 3.14 o'clock in Zürich 🤖 — and the model scores every token of this text.\n\tThe end."


@pytest.mark.slow
@pytest.mark.parametrize("architecture", EXPORTS)
def test_export_scores_text_like_gptlab(tmp_path, architecture, offline):
    """End to end, as lm-evaluation-harness does: the export's own tokenizer and model, loaded offline, give a
    text gptlab's ids and gptlab's log-probability of each token."""
    model = EXPORTS[architecture]()
    export_hf(model, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == gpt2_tokenizer().encode_ordinary(TEXT)
    targets = ids[:, 1:, None]
    hf_scores = log_probs(hf_logits(hf_model, ids))[:, :-1].gather(-1, targets)
    gptlab_scores = log_probs(gptlab_logits(model, ids))[:, :-1].gather(-1, targets)
    assert (hf_scores - gptlab_scores).abs().max() <= 1e-5
