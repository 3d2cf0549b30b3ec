"""A GPT language model in plain PyTorch (no Lightning), after nanoGPT.

The defaults are GPT-2: pre-LayerNorm blocks, causal self-attention through F.scaled_dot_product_attention,
a 4x GELU(tanh) MLP, learned position embeddings, a token embedding tied to the output head and GPT-2's
initialization. Every GPTConfig field (gptlab/model_config.py) below the sizes is a choice to ablate: rotary or
no positions, gated or squared-ReLU MLPs, grouped-query attention, QK-norm, soft-capped logits, z-loss,
zero-initialised projections, attention that stops at document boundaries.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gptlab.data.tokenizer import EOT
from gptlab.model_config import GPTConfig

NORM_EPS = 1e-5  # nn.LayerNorm's default and GPT-2's layer_norm_epsilon; RMSNorm uses the same


def make_norm(kind: str, size: int, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(size, eps=NORM_EPS)
    return nn.LayerNorm(size, eps=NORM_EPS, bias=bias)


def rope_cos_sin(positions: torch.Tensor, dims: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/dims) for i < dims/2, each repeated to `dims` columns as Llama lays
    them out (the first half of the rotated dims pairs with the second). positions: (..., T) -> (..., T, dims)."""
    # 1 / theta^(2i/dims), computed as transformers' Llama does: the same float32 angles at every position
    inv_freq = 1.0 / theta ** (torch.arange(0, dims, 2, device=positions.device, dtype=torch.float32) / dims)
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) dims of x (B, heads, T, head_size) by their positions' angles; the rest
    (partial rotary) pass unchanged. Computed in float32, returned in x's dtype."""
    dims = cos.size(-1)
    rotated, rest = x[..., :dims].float(), x[..., dims:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def manual_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, with dropout on the attention weights, written out: the reference
    F.scaled_dot_product_attention is tested against. q: (B, n_head, T, head_size); k, v may have fewer heads
    (grouped-query), each serving n_head / n_kv_head query heads. mask: True where attention may look (causal if
    None)."""
    T = q.size(-2)
    k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return F.dropout(weights, p=dropout_p) @ v


def document_ids(idx: torch.Tensor) -> torch.Tensor:
    """(B, T) -> the index of the document each token belongs to: a document starts at each <|endoftext|>."""
    return (idx == EOT).cumsum(dim=1)


def document_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) causal mask that also stops at document boundaries."""
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (causal & (doc.unsqueeze(2) == doc.unsqueeze(1))).unsqueeze(1)


def flex_document_attention(q, k, v, doc: torch.Tensor) -> torch.Tensor:
    """FlexAttention (CUDA) with a block mask built from document ids: only the blocks a document spans run."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    B, T = doc.shape
    block_mask = create_block_mask(same_document_causal, B, None, T, T, device=doc.device)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=k.size(1) != q.size(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.manual = config.attention == "manual"
        self.attn_dropout = config.attn_dropout
        # q, k, v in one matmul: n_head query heads, n_kv_head key and value heads
        qkv = (config.n_head + 2 * config.kv_heads) * config.head_size
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        if config.qk_norm != "none":  # per head, over head_size, shared by all heads
            self.q_norm = make_norm(config.qk_norm, config.head_size, config.bias)
            self.k_norm = make_norm(config.qk_norm, config.head_size, config.bias)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(
        self, x: torch.Tensor, rope: tuple | None = None, doc: torch.Tensor | None = None, attn_mask=None
    ) -> torch.Tensor:
        """rope: (cos, sin) of the positions, or None; doc: (B, T) document ids with model.document_mask;
        attn_mask: (B, 1, T, T), True where a query may look (see GPT.forward), or None: causal."""
        B, T, C = x.shape
        kv_size = self.n_kv_head * self.head_size
        q, k, v = self.c_attn(x).split([C, kv_size, kv_size], dim=2)
        # (B, T, heads * head_size) -> (B, heads, T, head_size)
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout_p = self.attn_dropout if self.training else 0.0
        mask = attn_mask
        if doc is not None:
            mask = document_mask(doc) if mask is None else mask & document_mask(doc)
        gqa = self.n_kv_head != self.n_head
        if self.manual:
            y = manual_attention(q, k, v, dropout_p, mask)
        elif doc is not None and attn_mask is None and x.is_cuda and dropout_p == 0.0:
            y = flex_document_attention(q, k, v, doc)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=gqa
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """gelu: W2 GELU(W1 x), GPT-2's | relu2: W2 ReLU(W1 x)^2 | swiglu: W2 (SiLU(Wg x) * W1 x) | geglu: with GELU."""

    ACTIVATIONS = {
        "gelu": lambda x: F.gelu(x, approximate="tanh"),  # the GELU approximation GPT-2 was trained with
        "relu2": lambda x: F.relu(x).square(),
        "swiglu": F.silu,
        "geglu": lambda x: F.gelu(x, approximate="tanh"),
    }

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.hidden_size
        self.activation = self.ACTIVATIONS[config.mlp]
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        if config.mlp in ("swiglu", "geglu"):
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "c_gate"):
            h = self.activation(self.c_gate(x)) * self.c_fc(x)
        else:
            h = self.activation(self.c_fc(x))
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = make_norm(config.norm, config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config.norm, config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope=None, doc=None, attn_mask=None) -> torch.Tensor:
        if self.post_norm:  # Vaswani et al. (2017): normalize after each residual addition
            x = self.ln_1(x + self.attn(x, rope, doc, attn_mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, doc, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":  # rope and none have no position weights
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        pre_norm = config.norm_position == "pre"
        self.transformer = nn.ModuleDict(
            dict(
                **modules,
                drop=nn.Dropout(config.embd_dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                # Pre-norm leaves the residual stream unnormalized, so GPT-2 added a final norm. A post-norm
                # stack already ends in one and has none (Vaswani et al., 2017; GPT-1; Xiong et al., 2020).
                ln_f=make_norm(config.norm, config.n_embd, config.bias) if pre_norm else nn.Identity(),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017)
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear weights by `config.init`, biases zero, norms at one, embeddings N(0, init_std). Embeddings go
        last, so a tied head starts as an embedding under every scheme. zero_init_residual: the residual
        projections start at zero, so every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                self._init_linear(module)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name in ("wte", "wpe"):
            if name in self.transformer:
                nn.init.normal_(self.transformer[name].weight, mean=0.0, std=self.config.init_std)

    def _init_linear(self, linear: nn.Linear) -> None:
        """gpt2: N(0, init_std), residual projections (c_proj) scaled by 1/sqrt(2 n_layer) as each block adds
        two of them to the residual stream (Radford et al., 2019); normal: N(0, init_std) everywhere;
        xavier: nn.init.xavier_normal_, std sqrt(2 / (fan_in + fan_out)) (Glorot & Bengio, 2010);
        kaiming: nn.init.kaiming_normal_ with mode fan_in and the ReLU gain, std sqrt(2 / fan_in) (He et al., 2015;
        GELU is taken as ReLU). fan_in is in_features."""
        cfg, w = self.config, linear.weight
        residual = getattr(linear, "residual_scaled_init", False)
        if cfg.init == "xavier":
            nn.init.xavier_normal_(w)
        elif cfg.init == "kaiming":
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
        else:
            scaled = cfg.init == "gpt2" and residual
            nn.init.normal_(w, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer) if scaled else cfg.init_std)
        if cfg.zero_init_residual and residual:  # zeroed after the draw: every other weight as without it
            nn.init.zeros_(w)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops the position embedding, as nanoGPT
        does for FLOP estimates; the token embedding stays because it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab) and the mean cross-entropy (label-smoothed,
        and with z_loss added, in training mode where the config asks for them).

        For scoring packed rows (gptlab.eval.scoring), where several continuations share one context:
        logits_at: (N,) indices into the B * T positions (row-major); logits are computed there only, (N, vocab):
        the vocab-wide head dominates small models, and scoring needs a few positions.
        position_ids: (B, T) each token's position (default 0..T-1, or per document with document_positions);
        attn_mask: (B, 1, T, T) bool, True where a query may look; default causal (and per document with
        document_mask, which also applies on top of a given mask)."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size and position_ids is None:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        doc = document_ids(idx) if cfg.document_mask else None
        pos = self._token_positions(T, idx.device, doc) if position_ids is None else position_ids
        x = self.transformer.wte(idx)
        if cfg.position == "learned":
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        rope = rope_cos_sin(pos, cfg.rope_dims, cfg.rope_theta) if cfg.position == "rope" else None
        if rope is not None and pos.dim() == 2:  # per sequence: broadcast over the heads
            rope = tuple(t.unsqueeze(1) for t in rope)
        recompute = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            # Checkpointing keeps only the block's input and reruns its forward during backward.
            args = (x, rope, doc, attn_mask)
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        x = self.transformer.ln_f(x)
        if logits_at is not None:
            x = x.flatten(0, 1).index_select(0, logits_at)
        logits = self.lm_head(x)
        if cfg.logit_softcap is not None:  # the model's output: validation and scoring see these logits too
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        loss = None
        if targets is not None:
            loss = self.loss(logits, targets)
        return logits, loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (fp32 under autocast); in training, label smoothing and z_loss * logsumexp^2 added."""
        flat = logits.view(-1, logits.size(-1))
        smoothing = self.config.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(flat, targets.reshape(-1), label_smoothing=smoothing)
        if self.training and self.config.z_loss > 0:
            loss = loss + self.config.z_loss * torch.logsumexp(flat.float(), dim=-1).square().mean()
        return loss

    def _token_positions(self, T: int, device: torch.device, doc: torch.Tensor | None) -> torch.Tensor:
        """Each token's position: (T,), or (B, T) restarting at each document with model.document_positions."""
        pos = torch.arange(T, dtype=torch.long, device=device)
        if not self.config.document_positions:
            return pos
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        return pos - torch.where(starts, pos, 0).cummax(dim=1).values
