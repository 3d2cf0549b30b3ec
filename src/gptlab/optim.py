"""The `optimizer` group: one config class per option, and the parameter groups every option shares.

Each class names its torch.optim optimizer, and its fields are that optimizer's keywords, named as torch names
them, plus gptlab's own (GPTLAB_KEYS): every other field reaches torch as is. So a new keyword of an optimizer
is one field here, and a new torch optimizer is one class here and its conf/optimizer/<name>.yaml.
Learning-rate schedules are in gptlab/schedules.py.

torch is imported inside the builders: these configs are read, and a config mistake reported, before torch
loads (which takes seconds).
"""

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, Optional

from omegaconf import MISSING

from gptlab.schema import each, in_range, knob, length, non_negative, one_of, option, positive, require

if TYPE_CHECKING:
    import torch
    from torch import nn

GPTLAB_KEYS = ("name", "weight_decay", "decay_embeddings")  # fields gptlab applies itself, not torch keywords
decay_rates = each(in_range(0, 1, "[)"), 2)  # Adam's betas


@dataclass
class OptimizerConfig:
    """What every option has. `lr` is the peak learning rate the schedule multiplies; `weight_decay` reaches
    the >=2-D weights only (biases and norm gains never decay), coupled or decoupled as the optimizer does it."""

    torch_class: ClassVar[str]  # the optimizer's class in torch.optim

    name: str = MISSING  # the option (conf/optimizer/<name>.yaml)
    lr: float = knob(3e-3, positive)  # peak learning rate (the scheduler multiplies it)
    weight_decay: float = knob(0.0, non_negative)  # on >=2-D weights only
    decay_embeddings: bool = True  # the decay also reaches the token/position embeddings (false: matmul weights only)

    def build(self, model: "nn.Module") -> "torch.optim.Optimizer":
        import torch

        groups = param_groups(model, self.weight_decay, self.decay_embeddings)
        return getattr(torch.optim, self.torch_class)(groups, **self.torch_kwargs(model))

    def torch_kwargs(self, model: "nn.Module") -> dict:
        """Every field but gptlab's own, as keywords: lists become tuples; fused=null means fused on CUDA only."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in GPTLAB_KEYS}
        kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
        if "fused" in kwargs and kwargs["fused"] is None:
            kwargs["fused"] = True if next(model.parameters()).is_cuda else None
        return kwargs


@dataclass
class AdamFamilyConfig(OptimizerConfig):
    """What Adam and its variants share: the decay rates of the gradient's moment estimates, and eps."""

    betas: list[float] = knob([0.9, 0.95], decay_rates)  # decay rates of the first and second moment estimates
    eps: float = knob(1e-8, positive)  # added to the denominator sqrt(v) for stability


@option("optimizer")
@dataclass
class AdamConfig(AdamFamilyConfig):
    """Adam (Kingma & Ba 2015) with coupled L2: weight_decay * theta joins the gradient, and Adam normalises the
    sum, so the decay shrinks where gradients are large (the contrast with adamw's decoupled decay)."""

    torch_class: ClassVar[str] = "Adam"
    name: str = "adam"
    fused: Optional[bool] = None  # the fused kernel; null: on CUDA only


@option("optimizer")
@dataclass
class AdamWConfig(AdamConfig):
    """AdamW (Loshchilov & Hutter 2019): decoupled decay, theta -= lr * weight_decay * theta beside Adam's step."""

    torch_class: ClassVar[str] = "AdamW"
    name: str = "adamw"
    weight_decay: float = knob(0.1, non_negative)  # decoupled: independent of the gradient's scale


@option("optimizer")
@dataclass
class RAdamConfig(AdamFamilyConfig):
    """RAdam (Liu et al. 2020): Adam whose variance estimate is rectified while it rests on few steps, the
    paper's alternative to LR warmup. Defaults as adamw's, so that the two differ in the rectification alone."""

    torch_class: ClassVar[str] = "RAdam"
    name: str = "radam"
    weight_decay: float = knob(0.1, non_negative)
    decoupled_weight_decay: bool = True  # true: AdamW's decoupled decay (RAdamW) | false: coupled L2, as the paper


@option("optimizer")
@dataclass
class NAdamConfig(AdamFamilyConfig):
    """NAdam (Dozat 2016): Adam with Nesterov momentum, whose momentum warms up at the rate momentum_decay.
    Defaults as adamw's, so that the two differ in the Nesterov step alone."""

    torch_class: ClassVar[str] = "NAdam"
    name: str = "nadam"
    weight_decay: float = knob(0.1, non_negative)
    momentum_decay: float = knob(4e-3, non_negative)  # psi in mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) (torch's name)
    decoupled_weight_decay: bool = True  # true: AdamW's decoupled decay (NAdamW) | false: coupled L2


@option("optimizer")
@dataclass
class SGDConfig(OptimizerConfig):
    """SGD with (Nesterov) momentum: buf = momentum * buf + (1 - dampening) * g; step along g + momentum * buf."""

    torch_class: ClassVar[str] = "SGD"
    name: str = "sgd"
    lr: float = knob(0.1, positive)
    momentum: float = knob(0.9, non_negative)  # 0: plain SGD
    dampening: float = knob(0.0, in_range(0, 1))  # scales the gradient entering the momentum buffer by 1 - dampening
    nesterov: bool = True  # Nesterov momentum (needs momentum > 0 and dampening 0)

    def check(self) -> None:
        require(
            not self.nesterov or (self.momentum > 0 and self.dampening == 0),
            "nesterov",
            f"needs momentum > 0 and dampening 0 (got momentum={self.momentum}, dampening={self.dampening})",
        )


@option("optimizer")
@dataclass
class RMSpropConfig(OptimizerConfig):
    """RMSprop (Hinton 2012): divide the gradient by a running root mean square of recent gradients."""

    torch_class: ClassVar[str] = "RMSprop"
    name: str = "rmsprop"
    lr: float = knob(1e-3, positive)
    alpha: float = knob(0.99, in_range(0, 1, "[)"))  # smoothing constant of the squared-gradient average
    eps: float = knob(1e-8, positive)
    momentum: float = knob(0.0, non_negative)  # momentum on the normalised step (0: none)
    centered: bool = False  # normalise by the gradient's variance estimate instead of its second moment


@option("optimizer")
@dataclass
class AdagradConfig(OptimizerConfig):
    """Adagrad (Duchi et al. 2011): per-weight step lr / sqrt(sum of all past squared gradients)."""

    torch_class: ClassVar[str] = "Adagrad"
    name: str = "adagrad"
    lr: float = knob(1e-2, positive)
    lr_decay: float = knob(0.0, non_negative)  # lr / (1 + (step - 1) * lr_decay), on top of the scheduler
    initial_accumulator_value: float = knob(0.0, non_negative)  # starting value of the squared-gradient sum
    eps: float = knob(1e-10, positive)


@dataclass
class MuonAdamWConfig:
    """The AdamW that steps what Muon does not: embeddings, the output head, biases and norm weights."""

    lr: float = knob(3e-3, positive)  # its peak learning rate
    betas: list[float] = knob([0.9, 0.95], decay_rates)
    eps: float = knob(1e-8, positive)
    weight_decay: float = knob(0.0, non_negative)  # decoupled, on the embeddings and an untied head


@option("optimizer")
@dataclass
class MuonConfig(OptimizerConfig):
    """torch.optim.Muon (Jordan et al. 2024): momentum, then Newton-Schulz orthogonalisation of the update, on the
    2-D weights inside the transformer blocks; AdamW (`adamw`) steps the rest. The schedule scales both LRs."""

    torch_class: ClassVar[str] = "Muon"
    name: str = "muon"
    lr: float = knob(0.02, positive)  # peak Muon learning rate
    weight_decay: float = knob(0.0, non_negative)  # decoupled, on the hidden matrices
    momentum: float = knob(0.95, in_range(0, 1, "[)"))  # momentum buffer decay
    nesterov: bool = True  # orthogonalise g + momentum * buf instead of buf
    ns_coefficients: list[float] = knob([3.4445, -4.775, 2.0315], length(3))  # quintic Newton-Schulz (a, b, c)
    eps: float = knob(1e-7, positive)  # guards the normalisation before Newton-Schulz
    ns_steps: int = knob(5, in_range(1, 100, "[)"))  # Newton-Schulz iterations
    # null/original: lr * sqrt(max(1, rows/cols)) | match_rms_adamw: 0.2 * sqrt(max(rows, cols)) * lr
    adjust_lr_fn: Optional[str] = knob(None, one_of(None, "original", "match_rms_adamw"))
    adamw: MuonAdamWConfig = field(default_factory=MuonAdamWConfig)  # the AdamW for everything Muon does not step

    def build(self, model: "nn.Module") -> "torch.optim.Optimizer":
        """Muon on the hidden matrices; AdamW on the rest (embeddings, an untied head, biases, norm weights)."""
        import torch

        from gptlab.muon import MuonWithAdamW

        hidden = hidden_matrices(model)
        kwargs = {k: v for k, v in self.torch_kwargs(model).items() if k != "adamw"}
        muon = torch.optim.Muon([{"name": "muon", "params": hidden}], weight_decay=self.weight_decay, **kwargs)
        a = self.adamw
        rest = param_groups(model, a.weight_decay, self.decay_embeddings, exclude=hidden)
        fused = True if next(model.parameters()).is_cuda else None
        adamw = torch.optim.AdamW(rest, lr=a.lr, betas=tuple(a.betas), eps=a.eps, fused=fused)
        return MuonWithAdamW(muon, adamw)


def param_groups(
    model: "nn.Module", weight_decay: float, decay_embeddings: bool, exclude: list["nn.Parameter"] = ()
) -> list[dict]:
    """Two groups: decay on >=2-D weights (matmuls, and embeddings if asked), none on biases and norms.

    Tied weights appear once, as nn.Module.parameters deduplicates them. `exclude`: stepped elsewhere (Muon).
    """
    from torch import nn

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


def hidden_matrices(model: "nn.Module") -> list["nn.Parameter"]:
    """The 2-D weights inside the transformer blocks: what Muon orthogonalises (as modded-nanogpt does)."""
    return [p for p in model.transformer.h.parameters() if p.ndim == 2 and p.requires_grad]
