"""Hugging Face interop: import a GPT-2 (`GPT2LMHeadModel`) into gptlab's GPT; export a GPT as an HF GPT-2 or
Llama (`LlamaForCausalLM`) folder, whichever computes the same function (export_target picks; a GPT with a
setting neither has, e.g. QK-norm, is refused naming it).

- GPT-2 is gptlab's default architecture (pre-norm, LayerNorm, learned positions, GELU MLP, tied head, biases);
  import sets it. Both use the same parameter names (`transformer.*`, `lm_head`), but HF keeps c_attn, c_proj
  and c_fc in Conv1D layers, whose weights are the transpose of nn.Linear's.
- Llama is pre-norm RMSNorm, RoPE on every dim of a head, a gated MLP, and optionally grouped-query attention,
  biases and an untied head. Its weights are gptlab's renamed, c_attn split into q_proj, k_proj and v_proj; both
  rotate q and k with rotate_half on a head's dims in their natural order, so no permutation is needed.
- Manual attention exports to either: it is the same function as sdpa.
- Vocabulary: HF GPT-2 has the tokenizer's 50257 rows; gptlab pads to 50304 for faster matmuls.
  Import keeps HF's rows unless asked to pad: the extra rows are zero, so the logits of real tokens are
  unchanged and the padded ids get logit 0 (gptlab.generate never samples them). Export (to either) keeps the
  model's padded rows by default: their logits are part of softmax's normalizer, so dropping them (vocab_size=50257)
  raises every log-probability by log(1 + p), p the probability the model gives the padded ids. The export's
  generation_config.json suppresses the padded ids, so `generate` never samples one the tokenizer cannot decode.
- Tokenizer: an export holds GPT-2's tokenizer (tokenizer.json + tokenizer_config.json), built offline from
  gptlab's rank file by gpt2_hf_tokenizer: tiktoken's ids, except that HF encodes the text `<|endoftext|>` as the
  special token 50256, as tiktoken's `encode(text, allowed_special="all")` does; `split_special_tokens=True` gives
  `encode_ordinary`'s ids (what gptlab's shards hold), which spell it out as text.

transformers and safetensors are an optional extra (`pip install -e .[hf]`): imported inside functions.
"""

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from hydra.core.config_store import ConfigStore

from gptlab.data.tokenizer import EOT, GPT2_PATTERN, RANKS_FILE, load_ranks
from gptlab.errors import ConfigError, DataError
from gptlab.files import remove
from gptlab.model import GPT, NORM_EPS, GPTConfig
from gptlab.schema import at_least, knob, optional, required

GPT2_VOCAB_SIZE = 50257  # the tokenizer's vocabulary; <|endoftext|> is the last id
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # Conv1D
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers, not weights
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # two implementations of the GELU(tanh) gptlab uses
LAYER_NORM_EPS = NORM_EPS  # nn.LayerNorm's default, what gptlab's GPT uses
GPT2_ARCHITECTURE = dict(norm_position="pre", norm="layernorm", tie_embeddings=True, bias=True)  # import sets these
GATED_ACTIVATIONS = dict(swiglu="silu", geglu="gelu_pytorch_tanh")  # gptlab's gated MLP -> Llama's hidden_act


class Need(NamedTuple):
    """A GPTConfig setting an export target needs: settings that change the function the weights compute. The
    others (dropouts, label smoothing, z_loss, init, attention sdpa|manual, compile, ...) matter in training only."""

    key: str  # the GPTConfig field
    holds: Callable[[GPTConfig], bool]
    why: str  # what the target has instead, for the error


BOTH_NEED = (  # settings neither target has; `why` says what, for "neither Hugging Face GPT-2 nor Llama has <why>"
    Need("qk_norm", lambda c: c.qk_norm == "none", "QK-norm"),
    Need("logit_softcap", lambda c: c.logit_softcap is None, "soft-capped logits"),
    Need("document_mask", lambda c: not c.document_mask, "attention that stops at document boundaries"),
    Need("document_positions", lambda c: not c.document_positions, "positions that restart at each document"),
)
GPT2_NEEDS = (
    Need("norm_position", lambda c: c.norm_position == "pre",
         "GPT-2 normalizes the input of each sublayer (pre-norm) and has a final ln_f: model.norm_position=pre"),
    Need("norm", lambda c: c.norm == "layernorm", "GPT-2 uses LayerNorm: model.norm=layernorm"),
    Need("bias", lambda c: c.bias, "GPT-2 has biases in every Linear and LayerNorm: model.bias=true"),
    Need("tie_embeddings", lambda c: c.tie_embeddings,
         "GPT-2's output head is the token embedding: model.tie_embeddings=true"),
    Need("position", lambda c: c.position == "learned", "GPT-2 learns a position embedding: model.position=learned"),
    Need("mlp", lambda c: c.mlp == "gelu", "GPT-2's MLP is W2 GELU(W1 x): model.mlp=gelu"),
    Need("n_kv_head", lambda c: c.kv_heads == c.n_head,
         "GPT-2 gives each query head its own key and value head: model.n_kv_head=null"),
    *BOTH_NEED,
)
LLAMA_NEEDS = (
    Need("norm_position", lambda c: c.norm_position == "pre", "Llama is pre-norm: model.norm_position=pre"),
    Need("norm", lambda c: c.norm == "rmsnorm", "Llama uses RMSNorm: model.norm=rmsnorm"),
    Need("position", lambda c: c.position == "rope", "Llama rotates q and k: model.position=rope"),
    Need("rope_fraction", lambda c: c.rope_dims == c.head_size,
         "Llama rotates all of each head's dims: model.rope_fraction=1"),
    Need("mlp", lambda c: c.mlp in GATED_ACTIVATIONS, "Llama's MLP is gated: model.mlp=swiglu or geglu"),
    *BOTH_NEED,
)
LLAMA_NAMES = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm", "lm_head": "lm_head"}
LLAMA_LAYER_NAMES = {  # a block's modules: gptlab -> HF Llama (attn.c_attn is split, see llama_state_dict)
    "ln_1": "input_layernorm",
    "attn.c_proj": "self_attn.o_proj",
    "ln_2": "post_attention_layernorm",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}
# What neither target has when a value of these rules out both (BOTH_NEED's settings say it themselves).
NEITHER_HAS = dict(
    norm_position="post-norm blocks",
    position="a model without positions",
    mlp="this MLP (GPT-2's is GELU, Llama's gated)",
)


@dataclass
class ExportHFConfig:
    """The root of scripts/export_hf.py (conf/export_hf.yaml)."""

    checkpoint: Optional[str] = knob(None, required("a gptlab training checkpoint (.ckpt)"))
    out: Optional[str] = knob(None, required("the folder to write (created if missing)"))
    # null: the model's vocabulary, padded rows included (log-probabilities equal gptlab's); 50257 drops the padded
    # rows: every log-probability then rises by log(1 + the probability gptlab gives the padded ids)
    vocab_size: Optional[int] = knob(None, optional(at_least(GPT2_VOCAB_SIZE)))
    # a folder `out` with files in it is refused unless overwrite=true: the export then replaces it whole
    overwrite: bool = False


ConfigStore.instance().store(name="export_hf_schema", node=ExportHFConfig)


def import_hf_gpt2(name_or_path: str, vocab_size: int | None = None) -> GPT:
    """A gptlab GPT from a Hugging Face GPT-2: a local folder (config.json + weights) or a hub name (online)."""
    from transformers import AutoConfig, GPT2LMHeadModel

    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "config.json").is_file():
        raise DataError(f"{name_or_path} has no config.json: not a Hugging Face model folder")
    try:
        hf_config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # no such folder or hub model, offline, or an unknown model type
        raise DataError(f"cannot load a Hugging Face config from {name_or_path!r}: {_first_line(e)}") from None
    check_gpt2_config(hf_config, name_or_path)
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path, config=hf_config, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:  # missing or damaged weights
        raise DataError(f"cannot load the GPT-2 weights of {name_or_path!r}: {_first_line(e)}") from None
    return gpt_from_hf_model(hf_model, vocab_size)


def gpt_from_hf_model(hf_model, vocab_size: int | None = None) -> GPT:
    """gptlab's GPT with the weights of an in-memory `GPT2LMHeadModel`, in eval mode.

    vocab_size pads the vocabulary (e.g. 50304) with zero rows; None keeps HF's size."""
    hf_config = hf_model.config
    check_gpt2_config(hf_config, type(hf_model).__name__)
    hf_vocab = hf_config.vocab_size
    vocab_size = hf_vocab if vocab_size is None else vocab_size
    if vocab_size < hf_vocab:
        raise DataError(f"vocab_size {vocab_size} is smaller than the model's vocabulary of {hf_vocab}")
    config = GPTConfig(
        block_size=hf_config.n_positions,
        vocab_size=vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        **GPT2_ARCHITECTURE,
    )  # dropout stays 0: an imported model is for inference
    model = GPT(config)
    hf_state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith(HF_BUFFERS)}
    hf_state.pop("lm_head.weight", None)  # tied to wte: copied through it
    state = model.state_dict()
    if set(hf_state) != set(state) - {"lm_head.weight"}:
        missing = sorted(set(state) - set(hf_state) - {"lm_head.weight"})
        unexpected = sorted(set(hf_state) - set(state))
        raise DataError(f"cannot map the GPT-2 weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, weight in hf_state.items():
            weight = weight.t() if name.endswith(TRANSPOSED) else weight
            if name == "transformer.wte.weight":
                state[name].zero_()  # padding rows stay zero
                state[name][:hf_vocab].copy_(weight)
            else:
                state[name].copy_(weight)
    return model.eval()


def check_gpt2_config(hf_config, source: str) -> None:
    """Refuse what gptlab's GPT cannot reproduce exactly."""
    problems = []
    if hf_config.model_type != "gpt2":
        problems.append(f"model_type is {hf_config.model_type!r}, not 'gpt2'")
    else:
        if hf_config.activation_function not in GELU_TANH:
            problems.append(f"activation_function is {hf_config.activation_function!r}, gptlab has only gelu_new")
        if not getattr(hf_config, "tie_word_embeddings", True):
            problems.append("the output head is not tied to the token embedding")
        if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
            problems.append(f"n_inner is {hf_config.n_inner}, gptlab's MLP is 4 x n_embd")
        if abs(hf_config.layer_norm_epsilon - LAYER_NORM_EPS) > 1e-12:
            problems.append(f"layer_norm_epsilon is {hf_config.layer_norm_epsilon}, gptlab uses {LAYER_NORM_EPS}")
        if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
            problems.append("attention scores are not scaled by 1/sqrt(head_size) alone")
        if hf_config.add_cross_attention:
            problems.append("it has cross-attention")
    if problems:
        raise DataError(f"{source} cannot be imported into gptlab's GPT: {'; '.join(problems)}")


def export_target(config: GPTConfig) -> str:
    """The transformers class that computes the same function as a GPT of this config: "GPT2LMHeadModel" or
    "LlamaForCausalLM". Otherwise a one-line DataError naming the setting in the way."""
    gpt2_unmet = [need for need in GPT2_NEEDS if not need.holds(config)]
    llama_unmet = [need for need in LLAMA_NEEDS if not need.holds(config)]
    if not gpt2_unmet:
        return "GPT2LMHeadModel"
    if not llama_unmet:
        return "LlamaForCausalLM"
    llama_keys = {need.key for need in llama_unmet}
    for need in gpt2_unmet:  # in GPTConfig's field order
        if need.key in llama_keys:
            raise DataError(
                f"cannot export model.{need.key}={getattr(config, need.key)}: neither Hugging Face GPT-2 nor Llama "
                f"has {NEITHER_HAS.get(need.key, need.why)}"
            )
    gpt2, llama = gpt2_unmet[0], llama_unmet[0]  # each setting has an equivalent in one target, not all in one
    raise DataError(
        f"cannot export the model: model.{gpt2.key}={getattr(config, gpt2.key)} rules out Hugging Face GPT-2 "
        f"({gpt2.why}), and model.{llama.key}={getattr(config, llama.key)} rules out Llama ({llama.why})"
    )


def export_hf(model: GPT, folder: Path, vocab_size: int | None = None) -> Path:
    """Write `model` as a Hugging Face folder into `folder`: a GPT-2 or a Llama, as export_target picks
    (config.json + model.safetensors + generation_config.json), with GPT-2's tokenizer. vocab_size None keeps the
    model's vocabulary, padded rows included; a smaller one drops the rows beyond it. Returns the folder."""
    import transformers

    config = model.config
    target = export_target(config)
    vocab_size = config.vocab_size if vocab_size is None else vocab_size
    if config.vocab_size < GPT2_VOCAB_SIZE:
        raise DataError(f"the model's vocabulary ({config.vocab_size}) is smaller than GPT-2's ({GPT2_VOCAB_SIZE})")
    if not GPT2_VOCAB_SIZE <= vocab_size <= config.vocab_size:
        raise DataError(
            f"vocab_size must be {GPT2_VOCAB_SIZE} (GPT-2's) to {config.vocab_size} (the model's), not {vocab_size}"
        )
    if target == "GPT2LMHeadModel":
        hf_model = transformers.GPT2LMHeadModel(gpt2_config(config, vocab_size))
        state = gpt2_state_dict(model, vocab_size)
    else:
        hf_model = transformers.LlamaForCausalLM(llama_config(config, vocab_size))
        state = llama_state_dict(model, vocab_size)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(HF_BUFFERS)]
    if missing or unexpected:  # a GPT this module does not know how to map
        raise DataError(f"cannot export the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf_model.generation_config = generation_config(vocab_size)
    tokenizer = gpt2_hf_tokenizer(config.block_size)  # before writing anything: a damaged rank file leaves no folder
    folder = Path(folder)
    hf_model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder


def check_out(out: Path, overwrite: bool) -> None:
    """scripts/export_hf.py's `out`, before the model loads: not a file, and not a folder with files in it unless
    overwrite=true (an earlier export's files would stay beside the new ones)."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError("out", f"{out} is not empty: pass overwrite=true to replace it with the export")


def export_hf_replacing(model: GPT, out: Path, vocab_size: int | None = None) -> Path:
    """export_hf into a new folder beside `out`, then renamed to `out` (the old one deleted after): a failure
    leaves `out` as it was, and nothing of an earlier export stays beside the new one. Returns `out` resolved."""
    out = Path(out).resolve()
    for stale in out.parent.glob(f".{out.name}.tmp*"):  # left by a killed export
        remove(stale)
    new, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.tmp{os.getpid()}.old")
    try:
        export_hf(model, new, vocab_size)
    except BaseException:
        remove(new)
        raise
    if out.exists():
        out.rename(old)
    new.rename(out)
    remove(old)
    return out


def generation_config(vocab_size: int):
    """`generate`'s defaults for an export: <|endoftext|> begins and ends a text, and the padded ids, which the
    tokenizer cannot decode, are never sampled."""
    from transformers import GenerationConfig

    padded = list(range(GPT2_VOCAB_SIZE, vocab_size))
    return GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, suppress_tokens=padded or None)


def gpt2_hf_tokenizer(block_size: int):
    """GPT-2's tokenizer as a transformers `PreTrainedTokenizerFast`, built offline from gptlab's rank file, with
    tiktoken's ids (its byte-level BPE and regex, converted by transformers' TikTokenConverter). `<|endoftext|>`
    (50256) is its special token: bos, eos and unk. block_size is its model_max_length."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(converted_gpt2_tokenizer()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,  # decode(ids) gives the text back as it was, " ." included
    )


@functools.cache
def converted_gpt2_tokenizer() -> str:
    """The `tokenizers` JSON of GPT-2's BPE, converted from the rank file once per process (about a second)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # sha-verified (tiktoken's loader caches unverified)
            return load_ranks(Path(path))

    converter = RanksConverter(
        vocab_file=str(RANKS_FILE),
        pattern=GPT2_PATTERN,
        add_prefix_space=False,  # tiktoken puts no space before a text's first word
        extra_special_tokens=["<|endoftext|>"],  # appended after the 50256 ranks: id 50256
    )
    return converter.converted().to_str()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.save_pretrained, naming the class that every transformers version loads a tokenizer.json with:
    transformers 5 writes its own `TokenizersBackend`, which transformers 4 does not have."""
    tokenizer.save_pretrained(folder)
    config_file = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def gpt2_config(config: GPTConfig, vocab_size: int):
    """HF GPT-2's config for a GPT of GPT-2's architecture (export_target's "GPT2LMHeadModel")."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None if config.hidden_size == 4 * config.n_embd else config.hidden_size,  # None: GPT-2's 4d
        activation_function="gelu_new",
        resid_pdrop=config.resid_dropout,
        embd_pdrop=config.embd_dropout,
        attn_pdrop=config.attn_dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=True,
        bos_token_id=EOT,  # <|endoftext|>
        eos_token_id=EOT,
    )


def llama_config(config: GPTConfig, vocab_size: int):
    """HF Llama's config for a GPT that maps to it (export_target's "LlamaForCausalLM")."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.hidden_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_size,
        hidden_act=GATED_ACTIVATIONS[config.mlp],
        max_position_embeddings=config.block_size,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,  # RMSNorm has no bias, so model.bias is the Linears' alone
        mlp_bias=config.bias,
        attention_dropout=config.attn_dropout,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=EOT,  # <|endoftext|>
        eos_token_id=EOT,
    )


def gpt2_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """gptlab's weights under HF GPT-2's layout: Conv1D weights transposed, the vocabulary cut to vocab_size."""
    state = {}
    for name, weight in model.state_dict().items():
        weight = weight.detach().float()
        if name.endswith(TRANSPOSED):
            weight = weight.t()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            weight = weight[:vocab_size]
        state[name] = weight.contiguous().clone()
    return state


def llama_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """gptlab's weights under HF Llama's names: c_attn's rows split into q, k and v (the order c_attn computes
    them in), the vocabulary cut to vocab_size. A name without a Llama equivalent keeps its own, so the load fails."""
    config = model.config
    kv_size = config.kv_heads * config.head_size
    state = {}
    for name, weight in model.state_dict().items():
        weight = weight.detach().float()
        module, param = name.rsplit(".", 1)
        if module in ("transformer.wte", "lm_head"):
            weight = weight[:vocab_size]
        if module in LLAMA_NAMES:
            state[f"{LLAMA_NAMES[module]}.{param}"] = weight
        elif module.startswith("transformer.h."):
            _, _, layer, block_module = module.split(".", 3)  # transformer.h.<layer>.<module in the block>
            prefix = f"model.layers.{layer}"
            if block_module == "attn.c_attn":
                q, k, v = weight.split([config.n_embd, kv_size, kv_size])
                state.update({f"{prefix}.self_attn.{p}_proj.{param}": w for p, w in zip("qkv", (q, k, v))})
            else:
                state[f"{prefix}.{LLAMA_LAYER_NAMES.get(block_module, block_module)}.{param}"] = weight
        else:
            state[name] = weight
    return {name: weight.contiguous().clone() for name, weight in state.items()}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
