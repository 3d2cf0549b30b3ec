"""Parameter groups, optimizer and learning-rate schedule factories."""

import math
from collections.abc import Callable

import torch
from torch import nn

from gptlab.config import AdamWConfig, CosineConfig


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Two AdamW groups: decay on >=2-D weights (matmuls, and embeddings if asked), none on biases and norms.

    Tied weights appear once, as nn.Module.named_parameters deduplicates them.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        wants_decay = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if wants_decay else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: AdamWConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=on_cuda or None
    )


def lr_multiplier(cfg: CosineConfig, total_steps: int) -> Callable[[int], float]:
    """Step -> factor on the peak LR: linear warmup, then cosine decay to min_lr_ratio at total_steps."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step >= total_steps:
            return floor
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: CosineConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
