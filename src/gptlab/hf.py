"""Hugging Face GPT-2 interop: import a `GPT2LMHeadModel` into gptlab's GPT, export a GPT as an HF folder.

Both models use the same parameter names (`transformer.*`, `lm_head`); the differences are:
- HF keeps c_attn, c_proj and c_fc in Conv1D layers, whose weights are the transpose of nn.Linear's.
- Architecture: GPT-2 is gptlab's default (pre-norm, LayerNorm, tied head, biases); import sets it, and export
  refuses a model with another (see GPT2_ARCHITECTURE). Manual attention exports: it is the same function.
- Vocabulary: HF GPT-2 has the tokenizer's 50257 rows; gptlab pads to 50304 for faster matmuls.
  Import keeps 50257 unless asked to pad: the extra rows are zero, so the logits of real tokens are
  unchanged and the padded ids get logit 0 (gptlab.generate never samples them). Export drops the rows
  beyond vocab_size (padded ids are never targets, so no real token loses anything).

transformers and safetensors are an optional extra (`pip install -e .[hf]`): imported inside functions.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore

from gptlab.errors import DataError
from gptlab.model import GPT, NORM_EPS, GPTConfig
from gptlab.schema import at_least, knob, required

GPT2_VOCAB_SIZE = 50257  # the tokenizer's vocabulary; <|endoftext|> is the last id
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # Conv1D
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older transformers, not weights
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # two implementations of the GELU(tanh) gptlab uses
LAYER_NORM_EPS = NORM_EPS  # nn.LayerNorm's default, what gptlab's GPT uses
# GPTConfig settings GPT-2 has; a model with other values cannot be exported (attention sdpa or manual: same math).
GPT2_ARCHITECTURE = dict(norm_position="pre", norm="layernorm", tie_embeddings=True, bias=True)
WHY_GPT2_CANNOT = dict(
    norm_position="GPT-2 normalizes the input of each sublayer (pre-norm) and has a final ln_f",
    norm="GPT-2 uses LayerNorm",
    tie_embeddings="GPT-2's output head is the token embedding",
    bias="GPT-2 has biases in every Linear and LayerNorm",
)


@dataclass
class ExportHFConfig:
    """The root of scripts/export_hf.py (conf/export_hf.yaml)."""

    checkpoint: Optional[str] = knob(None, required("a gptlab training checkpoint (.ckpt)"))
    out: Optional[str] = knob(None, required("the folder to write (created if missing)"))
    vocab_size: int = knob(GPT2_VOCAB_SIZE, at_least(1))  # GPT-2's tokenizer; padded rows beyond it are dropped


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


def export_hf(model: GPT, folder: Path, vocab_size: int = GPT2_VOCAB_SIZE) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder (config.json + model.safetensors) into `folder`.

    The rows of a padded vocabulary beyond vocab_size are dropped. Returns the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    check_exportable(config)
    if config.vocab_size < vocab_size:
        raise DataError(f"the model's vocabulary ({config.vocab_size}) is smaller than vocab_size {vocab_size}")
    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=config.resid_dropout,
        embd_pdrop=config.embd_dropout,
        attn_pdrop=config.attn_dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=True,
        bos_token_id=GPT2_VOCAB_SIZE - 1,  # <|endoftext|>
        eos_token_id=GPT2_VOCAB_SIZE - 1,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model, vocab_size), strict=False)
    missing = [k for k in missing if not k.endswith(HF_BUFFERS)]
    if missing or unexpected:  # a GPT this module does not know how to map
        raise DataError(f"cannot export the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    folder = Path(folder)
    hf_model.save_pretrained(folder, safe_serialization=True)
    return folder


def check_exportable(config: GPTConfig) -> None:
    """Refuse an architecture GPT-2 cannot express, naming the model setting."""
    for key, gpt2_value in GPT2_ARCHITECTURE.items():
        value = getattr(config, key)
        if value != gpt2_value:
            raise DataError(
                f"cannot export a model with model.{key}={value} as a Hugging Face GPT-2: "
                f"{WHY_GPT2_CANNOT[key]} (model.{key}={str(gpt2_value).lower()})"
            )


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
