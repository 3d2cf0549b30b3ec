"""The `model` group: GPTConfig, every architecture choice of gptlab/model.py with its default and rule.

Kept out of model.py, which loads torch (seconds), so that a mistake in a config is reported in about a second.
The defaults are GPT-2 small; conf/model/<size>.yaml states only what differs.

A checkpoint keeps this config on its own (`gpt_config`, versioned), so the eval, sample and export scripts
and a resumed run rebuild the GPT through these rules alone, whatever the training rules of the day.

The `depth` dial sizes a model family from one integer, as nanochat does (conf/model/depth.yaml):
n_layer = depth, n_head = ceil(depth x aspect_ratio / head_dim), n_embd = n_head x head_dim.
"""

from dataclasses import asdict, dataclass
from typing import Optional

from gptlab.errors import ConfigError, DataError
from gptlab.schema import at_least, in_range, knob, load, non_negative, one_of, optional, positive, require

GPT_CONFIG_KEY = "gpt_config"  # in a checkpoint: the model's config on its own (gpt_config_record)
GPT2_VOCAB = 50257  # ids the GPT-2 tokenizer can produce; the model's vocab_size must cover them
VERSION = 3  # of the record a checkpoint keeps: bump it, and migrate in gpt_config_from_record, if a field changes
# (3 added depth, aspect_ratio and head_dim: older records lack them and read as depth null, their sizes as recorded)
LEGACY_VERSION = 0  # checkpoints written before the record existed: the same fields, in hyper_parameters.config.model

probability = in_range(0, 1, "[)")  # of a dropout, or label smoothing


@dataclass
class GPTConfig:
    block_size: int = knob(1024, at_least(1))  # longest sequence the position embedding covers
    vocab_size: int = knob(50304, at_least(GPT2_VOCAB))  # GPT-2's 50257 tokens padded to a multiple of 64
    n_layer: Optional[int] = knob(12, optional(at_least(1)))  # null: set by depth
    n_head: Optional[int] = knob(12, optional(at_least(1)))  # null: set by depth
    n_embd: Optional[int] = knob(768, optional(at_least(1)))  # d_model, a multiple of n_head; null: set by depth
    # size from one number (nanochat's --depth): n_layer = depth, n_head = ceil(depth x aspect_ratio / head_dim),
    # n_embd = n_head x head_dim; n_layer, n_head and n_embd left null take these values (see depth_sizes)
    depth: Optional[int] = knob(None, optional(at_least(1)))  # null: the sizes are n_layer, n_head, n_embd as given
    aspect_ratio: int = knob(64, at_least(1))  # with depth: width per layer, n_embd ~ depth x 64 (nanochat's)
    head_dim: int = knob(128, at_least(1))  # with depth: the width of every head (nanochat's 128; GPT-2's is 64)
    # architecture
    # pre: x + f(norm(x)), GPT-2 | post: norm(x + f(x)), the original Transformer (no final norm)
    norm_position: str = knob("pre", one_of("pre", "post"))
    norm: str = knob("layernorm", one_of("layernorm", "rmsnorm"))  # rmsnorm: x / rms(x) * weight (no centring, bias)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    tie_embeddings: bool = True  # the output head shares the token embedding's weight (Press & Wolf, 2017)
    # sdpa: F.scaled_dot_product_attention (fused kernels) | manual: softmax(QK^T/sqrt(d) + mask) V written out
    attention: str = knob("sdpa", one_of("sdpa", "manual"))
    # learned: GPT-2's position embedding | rope: rotary embedding of q and k (Su et al., 2021) | none: NoPE
    position: str = knob("learned", one_of("learned", "rope", "none"))
    rope_theta: float = knob(10000.0, positive)  # RoPE's base: frequencies theta^(-2i/d)
    rope_fraction: float = knob(1.0, in_range(0, 1, "(]"))  # share of each head's dims rotated (GPT-NeoX: 0.25)
    # gelu: GPT-2's 4d GELU(tanh) MLP | relu2: ReLU(x)^2 (So et al., 2021) | swiglu: W2(SiLU(W1 x) * W3 x)
    # (Shazeer, 2020; Llama) | geglu: the same with GELU
    mlp: str = knob("gelu", one_of("gelu", "relu2", "swiglu", "geglu"))
    mlp_hidden: Optional[int] = knob(None, optional(at_least(1)))  # null: 4d; gated: 8/3 d up to multiple_of
    multiple_of: int = knob(256, at_least(1))  # a gated MLP's default hidden width rounds up to this (Llama)
    # key/value heads: null = n_head (multi-head) | 1: multi-query | between: grouped-query (Ainslie et al., 2023)
    n_kv_head: Optional[int] = knob(None, optional(at_least(1)))
    qk_norm: str = knob("none", one_of("none", "rmsnorm", "layernorm"))  # of q and k, per head (Dehghani et al., 2023)
    logit_softcap: Optional[float] = knob(None, optional(positive))  # logits = cap * tanh(z / cap) (Gemma 2)
    z_loss: float = knob(0.0, non_negative)  # training loss + z_loss * logsumexp(z)^2 (PaLM: 1e-4)
    # attention stays inside each document of a packed sequence (documents start at <|endoftext|>)
    document_mask: bool = False
    document_positions: bool = False  # positions restart at 0 with each document (needs document_mask)
    # initialization (see GPT._init_linear): gpt2: N(0, init_std), residual projections / sqrt(2 n_layer) |
    # normal: N(0, init_std) | xavier: xavier_normal_ | kaiming: kaiming_normal_ (fan_in, relu gain)
    init: str = knob("gpt2", one_of("gpt2", "normal", "xavier", "kaiming"))
    init_std: float = knob(0.02, positive)  # std of gpt2 / normal init, and of the embeddings under every scheme
    zero_init_residual: bool = False  # residual projections (attn and MLP c_proj) start at zero (modded-nanogpt)
    # regularization, in training only
    embd_dropout: float = knob(0.0, probability)  # on token + position embeddings (HF GPT-2: embd_pdrop)
    attn_dropout: float = knob(0.0, probability)  # on the attention weights (attn_pdrop)
    resid_dropout: float = knob(0.0, probability)  # on each residual branch's output (resid_pdrop)
    label_smoothing: float = knob(0.0, probability)  # of the training loss; validation and HellaSwag: plain CE
    # memory and speed: neither changes the function the model computes
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the model (training, validation, HellaSwag)

    def __post_init__(self):
        """Sizes left null take depth's values here, so that every way a GPTConfig is made (Hydra, code, a
        checkpoint's record) builds the same model; check() rejects a size that disagrees with depth."""
        if self.depth is None or min(self.depth, self.aspect_ratio, self.head_dim) < 1:  # check() reports those
            return
        for name, value in depth_sizes(self.depth, self.aspect_ratio, self.head_dim).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def rope_dims(self) -> int:
        """Dims of each head that RoPE rotates: rope_fraction of head_size, rounded down to an even number."""
        return int(self.head_size * self.rope_fraction) // 2 * 2

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width: mlp_hidden, else 4d, or for gated MLPs 2/3 of that rounded up to multiple_of
        (the same parameters as a 4d ungated MLP, as Llama sizes it)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp not in ("swiglu", "geglu"):
            return 4 * self.n_embd
        return -(-int(8 * self.n_embd / 3) // self.multiple_of) * self.multiple_of

    def check(self) -> None:
        self._check_sizes()
        require(
            self.n_embd % self.n_head == 0,
            "n_embd",
            f"must be divisible by n_head (got n_embd={self.n_embd}, n_head={self.n_head})",
        )
        require(
            self.n_head % self.kv_heads == 0,
            "n_kv_head",
            f"must divide n_head: each key/value head serves a group of query heads (got n_head={self.n_head}, "
            f"n_kv_head={self.n_kv_head})",
        )
        require(
            self.position != "rope" or self.rope_dims >= 2,
            "rope_fraction",
            f"rotates {self.rope_dims} of the head's {self.head_size} dims; RoPE needs at least 2 (an even pair)",
        )
        require(
            self.position != "rope" or self.head_size % 2 == 0,
            "n_embd",
            f"RoPE rotates pairs of dims: the head size n_embd / n_head must be even (got {self.head_size})",
        )
        require(
            not self.document_positions or self.document_mask,
            "document_positions",
            "restarts positions at each document, which only means something with model.document_mask=true",
        )
        require(
            not self.document_positions or self.position != "none",
            "document_positions",
            "needs positions to restart: model.position is none",
        )

    def _check_sizes(self) -> None:
        """Each size is given (depth null) or agrees with depth (null in the config, or the same number)."""
        sizes = {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd}
        if self.depth is None:
            for name, value in sizes.items():
                require(value is not None, name, "is null: give it, or set depth to size the model from one number")
            return
        derived = depth_sizes(self.depth, self.aspect_ratio, self.head_dim)
        wrong = [name for name, value in sizes.items() if value != derived[name]]
        require(
            not wrong,
            wrong[0] if wrong else "",
            f"depth={self.depth} sets {_listed(derived, wrong)}, not {_listed(sizes, wrong)} (n_layer = depth, "
            "n_head = ceil(depth x aspect_ratio / head_dim), n_embd = n_head x head_dim): set "
            f"{', '.join(wrong)} to null, as model=depth does, or depth to null",
        )


def _listed(values: dict, names: list[str]) -> str:
    return ", ".join(f"{name}={values[name]}" for name in names)


def depth_sizes(depth: int, aspect_ratio: int, head_dim: int) -> dict[str, int]:
    """n_layer, n_head and n_embd of the model `depth` sizes, as nanochat's scripts/base_train.py (build_model_meta,
    github.com/karpathy/nanochat) does: width depth x aspect_ratio, rounded up to whole heads of head_dim, so every
    head is head_dim wide. nanochat's first release kept the width at depth x aspect_ratio, with max(1, ceil(width
    / head_dim)) heads: the same whenever head_dim divides the width (every even depth at 64 and 128), and heads
    that do not divide the width otherwise (depth 5: 320 / 3)."""
    n_head = -(-depth * aspect_ratio // head_dim)  # ceil
    return {"n_layer": depth, "n_head": n_head, "n_embd": n_head * head_dim}


# Fields that change neither the weights' shapes nor the function they compute: a resumed run may change them.
RUNTIME_FIELDS = ("activation_checkpointing", "compile")


def gpt_config_record(config: GPTConfig) -> dict:
    """What a checkpoint keeps of the model: plain values and the record's version."""
    return {"version": VERSION, **asdict(config)}


def gpt_config_from_record(record: dict, where: str = "the checkpoint") -> GPTConfig:
    """The GPTConfig of a checkpoint's record, checked by the model's own rules only (a checkpoint stays loadable
    when a training rule changes). A record gptlab cannot read is a DataError naming `where`."""
    fields = dict(record)
    version = fields.pop("version", LEGACY_VERSION)
    if version > VERSION:
        raise DataError(f"{where} holds a model config of version {version}; this gptlab reads up to {VERSION}")
    try:
        return load(GPTConfig, fields, "model")
    except ConfigError as e:
        raise DataError(f"{where} holds a model config gptlab cannot use ({e})") from None


def gpt_config_from_checkpoint(checkpoint: dict, where: str = "the checkpoint") -> GPTConfig:
    """The GPTConfig a loaded checkpoint (or a sharded one's meta.pt) was written with: its own record, or for
    checkpoints written before the record existed, the model section of the run's config."""
    record = checkpoint.get(GPT_CONFIG_KEY)
    if record is None:  # LEGACY_VERSION: the record did not exist yet
        record = checkpoint.get("hyper_parameters", {}).get("config", {}).get("model")
    if not isinstance(record, dict):
        raise DataError(f"{where} holds no model config: not a checkpoint written by gptlab's scripts/train.py")
    return gpt_config_from_record(record, where)
