"""A GPT-2 language model in plain PyTorch (no Lightning), after nanoGPT.

The defaults are GPT-2: pre-LayerNorm blocks, causal self-attention through F.scaled_dot_product_attention,
a 4x GELU(tanh) MLP, learned position embeddings, a token embedding tied to the output head and GPT-2's
initialization. Every GPTConfig field (gptlab/model_config.py) below the sizes is a choice to ablate.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from gptlab.model_config import GPTConfig

NORM_EPS = 1e-5  # nn.LayerNorm's default and GPT-2's layer_norm_epsilon; RMSNorm uses the same


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, with dropout on the attention weights, written out: the
    reference F.scaled_dot_product_attention is tested against. q, k, v: (B, n_head, T, head_size)."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = F.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return F.dropout(weights, p=dropout_p) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.manual = config.attention == "manual"
        self.attn_dropout = config.attn_dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.manual:
            y = manual_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # the GELU approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scaled_init = True
        self.dropout = nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:  # Vaswani et al. (2017): normalize after each residual addition
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.embd_dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                # Pre-norm leaves the residual stream unnormalized, so GPT-2 added a final norm. A post-norm
                # stack already ends in one and has none (Vaswani et al., 2017; GPT-1; Xiong et al., 2020).
                ln_f=make_norm(config) if config.norm_position == "pre" else nn.Identity(),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf, 2017)
        self._init_weights()

    def _init_weights(self) -> None:
        """Linear weights by `config.init`, biases zero, norms at one, embeddings N(0, init_std). Embeddings go
        last, so a tied head starts as an embedding under every scheme."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                self._init_linear(module)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedding in (self.transformer.wte, self.transformer.wpe):
            nn.init.normal_(embedding.weight, mean=0.0, std=self.config.init_std)

    def _init_linear(self, linear: nn.Linear) -> None:
        """gpt2: N(0, init_std), residual projections (c_proj) scaled by 1/sqrt(2 n_layer) as each block adds
        two of them to the residual stream (Radford et al., 2019); normal: N(0, init_std) everywhere;
        xavier: nn.init.xavier_normal_, std sqrt(2 / (fan_in + fan_out)) (Glorot & Bengio, 2010);
        kaiming: nn.init.kaiming_normal_ with mode fan_in and the ReLU gain, std sqrt(2 / fan_in) (He et al., 2015;
        GELU is taken as ReLU). fan_in is in_features."""
        cfg, w = self.config, linear.weight
        if cfg.init == "xavier":
            nn.init.xavier_normal_(w)
        elif cfg.init == "kaiming":
            nn.init.kaiming_normal_(w, mode="fan_in", nonlinearity="relu")
        else:
            scaled = cfg.init == "gpt2" and getattr(linear, "residual_scaled_init", False)
            nn.init.normal_(w, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer) if scaled else cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once). non_embedding drops the position embedding, as nanoGPT
        does for FLOP estimates; the token embedding stays because it is also the output head."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab) and the mean cross-entropy (label-smoothed
        in training mode if config.label_smoothing is set).

        positions: (B, K) indices into T; if given, logits are computed there only, (B, K, vocab): the
        vocab-wide head dominates small models, and scoring (e.g. HellaSwag) needs a few positions."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            # Checkpointing keeps only the block's input and reruns its forward during backward.
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        x = self.transformer.ln_f(x)
        if positions is not None:
            x = x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            smoothing = self.config.label_smoothing if self.training else 0.0
            loss = F.cross_entropy(  # fp32 under autocast
                logits.view(-1, logits.size(-1)), targets.reshape(-1), label_smoothing=smoothing
            )
        return logits, loss
