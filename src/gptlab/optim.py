"""Parameter groups and the optimizer factory: one torch.optim optimizer per `optimizer=` option
(learning-rate schedules are in gptlab/schedules.py)."""

import torch
from torch import nn

from gptlab.config import MuonConfig, OptimizerConfig


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool, exclude: list[nn.Parameter] = ()
) -> list[dict]:
    """Two groups: decay on >=2-D weights (matmuls, and embeddings if asked), none on biases and norms.

    Tied weights appear once, as nn.Module.parameters deduplicates them. `exclude`: stepped elsewhere (Muon).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        wants_decay = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if wants_decay else no_decay).append(p)
    return [  # a group's name labels its lr in the logs
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names; weight decay, coupled or decoupled, reaches >=2-D weights only."""
    if isinstance(cfg, MuonConfig):
        return build_muon(model, cfg)
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    if cfg.name == "adamw":  # decoupled: theta shrinks by lr * wd * theta beside the adaptive step
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=_fused(model, cfg))
    if cfg.name == "adam":  # coupled L2: wd * theta joins the gradient, and Adam normalises the sum
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=_fused(model, cfg))
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening, nesterov=cfg.nesterov
        )
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(
            groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, centered=cfg.centered
        )
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(
            groups, lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps,
            initial_accumulator_value=cfg.initial_accumulator_value,
        )  # fmt: skip
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def _fused(model: nn.Module, cfg: OptimizerConfig) -> bool | None:
    """fused=null: the fused kernel on CUDA, PyTorch's default (foreach or a loop) elsewhere."""
    if cfg.fused is not None:
        return cfg.fused
    return True if next(model.parameters()).is_cuda else None


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks: what Muon orthogonalises (as modded-nanogpt does)."""
    return [p for p in model.transformer.h.parameters() if p.ndim == 2 and p.requires_grad]


def build_muon(model: nn.Module, cfg: MuonConfig) -> "MuonWithAdamW":
    """Muon on the hidden matrices; AdamW on the rest (embeddings, an untied head, biases, norm weights)."""
    hidden = hidden_matrices(model)
    muon = torch.optim.Muon(
        [{"name": "muon", "params": hidden}], lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        nesterov=cfg.nesterov, ns_coefficients=tuple(cfg.ns_coefficients), eps=cfg.eps, ns_steps=cfg.ns_steps,
        adjust_lr_fn=cfg.adjust_lr_fn,
    )  # fmt: skip
    a = cfg.adamw
    rest = param_groups(model, a.weight_decay, decay_embeddings=True, exclude=hidden)
    on_cuda = next(model.parameters()).is_cuda
    adamw = torch.optim.AdamW(rest, lr=a.lr, betas=tuple(a.betas), eps=a.eps, fused=True if on_cuda else None)
    return MuonWithAdamW(muon, adamw)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer, for everything that expects one: Lightning, LR schedulers,
    GradScaler, checkpoints.

    Its param_groups are the inner optimizers' own group dicts (Muon's first), so a scheduler's or
    GradScaler's pass over them reaches both, each group scaled from its own lr; and both inner optimizers
    use its `state` (keyed by parameter; their parameters are disjoint), so the inherited state_dict and
    load_state_dict cover both.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})  # adopts those very dicts
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning passes forward and backward as a closure
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups and self.state: share the new ones
        self._share()
