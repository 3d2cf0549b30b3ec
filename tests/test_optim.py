"""The optimizer group: parameter groups, every option against its definition, and Muon + AdamW as one
optimizer for LR schedulers, GradScaler, checkpoints and Lightning (the LR schedules are in test_schedules.py)."""

import copy
import dataclasses
import inspect
import io

import pytest
import torch

from gptlab.config import load_config
from gptlab.errors import ConfigError
from gptlab.model import GPT, GPTConfig
from gptlab.muon import MuonWithAdamW
from gptlab.optim import (
    GPTLAB_KEYS,
    AdamConfig,
    AdamWConfig,
    MuonAdamWConfig,
    MuonConfig,
    NAdamConfig,
    RAdamConfig,
    SGDConfig,
    hidden_matrices,
    param_groups,
)
from gptlab.schema import OPTIONS as SCHEMAS
from gptlab.train import run
from tests.conftest import CONF, compose_train

TINY = GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
OPTIONS = ["adamw", "adam", "radam", "nadam", "sgd", "rmsprop", "adagrad", "muon"]
TORCH_CLASS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "radam": torch.optim.RAdam,
    "nadam": torch.optim.NAdam,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "muon": MuonWithAdamW,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def ids(params):
    return {id(p) for p in params}


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY, **overrides))


def set_grads(model, scale=1.0, seed=1):
    """The same pseudo-random gradient for every model built by tiny_gpt, times `scale`."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = scale * 0.01 * torch.randn(p.shape, generator=gen)


def shipped(name):
    """The option as conf/optimizer/<name>.yaml defines it."""
    return load_config(compose_train([f"optimizer={name}"]))[0].optimizer


# --- parameter groups -------------------------------------------------------------------------------------


def test_weight_decay_applies_to_exactly_the_2d_weights():
    model = GPT(TINY)
    decay, no_decay = param_groups(model, weight_decay=0.1, decay_embeddings=True)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    assert ids(decay["params"]) == ids(matrices) and decay["weight_decay"] == 0.1
    assert ids(no_decay["params"]) == ids(vectors) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied weight once


def test_embeddings_can_be_left_undecayed():
    model = GPT(TINY)
    decay, no_decay = param_groups(model, weight_decay=0.1, decay_embeddings=False)
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert embeddings <= ids(no_decay["params"]) and not embeddings & ids(decay["params"])
    assert id(model.transformer.h[0].attn.c_attn.weight) in ids(decay["params"])


# --- every option -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_builds_steps_and_reduces_the_loss(name):
    """With its shipped defaults, each option brings the tiny GPT's loss on one small batch down by a quarter
    in 30 steps (an optimizer that does not step stays at ln(32) = 3.47); RAdam by 15%: its first 5 steps are
    un-adapted momentum SGD (its rectification, see below), tiny steps at these gradients."""
    model = tiny_gpt()
    opt = shipped(name).build(model)
    assert type(opt) is TORCH_CLASS[name]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 32, (4, 8), generator=gen), torch.randint(0, 32, (4, 8), generator=gen)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < (0.85 if name == "radam" else 0.75) * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


# Every knob of each option off its default (and off PyTorch's), so that a knob not passed on shows.
OFF_DEFAULT = {
    "adamw": {"betas": "[0.8,0.9]", "eps": "1e-6", "fused": "false"},
    "adam": {"betas": "[0.8,0.9]", "eps": "1e-6", "fused": "false"},
    "radam": {"betas": "[0.8,0.9]", "eps": "1e-6", "decoupled_weight_decay": "false"},
    "nadam": {"betas": "[0.8,0.9]", "eps": "1e-6", "momentum_decay": "0.01", "decoupled_weight_decay": "false"},
    "sgd": {"momentum": "0.5", "dampening": "0.1", "nesterov": "false"},
    "rmsprop": {"alpha": "0.9", "eps": "1e-6", "momentum": "0.5", "centered": "true"},
    "adagrad": {"lr_decay": "0.01", "initial_accumulator_value": "0.1", "eps": "1e-6"},
    "muon": {
        "momentum": "0.9", "nesterov": "false", "ns_coefficients": "[3.0,-3.2,1.2]", "eps": "1e-6", "ns_steps": "4",
        "adjust_lr_fn": "match_rms_adamw", "adamw.lr": "0.0234", "adamw.betas": "[0.8,0.9]", "adamw.eps": "1e-6",
        "adamw.weight_decay": "0.0567",
    },  # fmt: skip
}


def assert_group_has_knobs(group, cfg):
    for f in dataclasses.fields(cfg):
        if f.name in {"name", "decay_embeddings", "weight_decay", "adamw"}:
            continue
        value = getattr(cfg, f.name)
        assert group[f.name] == (tuple(value) if isinstance(value, list) else value), f.name


@pytest.mark.parametrize("name", OPTIONS)
def test_knobs_reach_pytorch_under_their_own_names(name):
    """Each yaml knob is the torch.optim argument of the same name, with its value (a renamed or dropped one
    fails here); weight_decay goes to the >=2-D group only."""
    knobs = {"lr": "0.0123", "weight_decay": "0.0456", **OFF_DEFAULT[name]}
    overrides = [f"optimizer={name}", *(f"optimizer.{k}={v}" for k, v in knobs.items())]
    cfg = load_config(compose_train(overrides))[0].optimizer
    fields = {f.name for f in dataclasses.fields(cfg)} - {"name", "decay_embeddings", "adamw"}
    if name == "muon":
        fields |= {f"adamw.{f.name}" for f in dataclasses.fields(cfg.adamw)}
    assert fields <= knobs.keys()  # a new knob needs an entry in OFF_DEFAULT
    opt = cfg.build(tiny_gpt())
    if name == "muon":
        (muon_group,) = opt.muon.param_groups
        assert_group_has_knobs(muon_group, cfg)
        assert muon_group["weight_decay"] == cfg.weight_decay == 0.0456
        decay, no_decay = opt.adamw.param_groups
        assert_group_has_knobs(decay, cfg.adamw)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.0567, 0.0)
    else:
        decay, no_decay = opt.param_groups
        assert_group_has_knobs(decay, cfg)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.0456, 0.0)
    assert opt.param_groups[0]["lr"] == 0.0123


def test_every_option_is_conf_and_schema_alike():
    """conf/optimizer/ has a yaml for every registered schema and no other: a new optimizer is its class and yaml."""
    yamls = sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))
    assert sorted(SCHEMAS["optimizer"]) == sorted(OPTIONS) == yamls


@pytest.mark.parametrize("name", OPTIONS)
def test_every_knob_is_a_keyword_of_the_torch_optimizer(name):
    """A field of an option is either gptlab's own (GPTLAB_KEYS) or a keyword of its torch.optim class by the same
    name: that is what makes a new keyword one field (OptimizerConfig.torch_kwargs passes the rest on as is)."""
    schema = SCHEMAS["optimizer"][name]
    torch_keywords = set(inspect.signature(getattr(torch.optim, schema.torch_class)).parameters)
    knobs = {f.name for f in dataclasses.fields(schema)} - set(GPTLAB_KEYS) - {"adamw"}  # muon's inner AdamW
    assert knobs and knobs <= torch_keywords, knobs - torch_keywords


def torch_reference(model, torch_class, weight_decay, **kwargs):
    """torch's own optimizer, built by hand on gptlab's two parameter groups (decay on >=2-D weights only)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch_class(groups, **kwargs)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("cfg_class, torch_class, extra", [
    (RAdamConfig, torch.optim.RAdam, {}),
    (NAdamConfig, torch.optim.NAdam, {"momentum_decay": 0.01}),
])  # fmt: skip
def test_radam_and_nadam_step_as_torchs_own(cfg_class, torch_class, extra, decoupled):
    """optimizer=radam and nadam, coupled and decoupled decay, take the very steps torch.optim.RAdam / NAdam take
    over 8 steps (RAdam's rectified phase starts at step 6 with these betas) on the same parameter groups."""
    lr, wd, betas, eps = 0.01, 0.3, [0.9, 0.99], 1e-7
    cfg = cfg_class(lr=lr, weight_decay=wd, betas=betas, eps=eps, decoupled_weight_decay=decoupled, **extra)
    ours, theirs = tiny_gpt(), tiny_gpt()
    opt = cfg.build(ours)
    ref = torch_reference(theirs, torch_class, wd, lr=lr, betas=tuple(betas), eps=eps,
                          decoupled_weight_decay=decoupled, **extra)  # fmt: skip
    assert type(opt) is torch_class
    for step in range(8):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            set_grads(model, seed=step)
            optimizer.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("decoupled", [True, False])
def test_radam_first_step_is_unadapted_momentum_sgd(decoupled):
    """RAdam's rectification (Liu et al. 2020): while the variance estimate rests on too few steps (rho_t <= 5,
    here rho_1 = 2/(1-beta2) - 1 - 2 beta2/(1-beta2) = 1), the step is lr * m_hat = lr * g, with no 1/sqrt(v)
    adaptation (Adam's first step would be lr * g/|g|). Decoupled decay shrinks >=2-D weights by lr * wd * theta;
    coupled decay adds wd * theta to g."""
    lr, wd = 0.1, 0.5
    theta0, g = tiny_gpt(), tiny_gpt()
    set_grads(g)
    model = first_step(RAdamConfig(lr=lr, weight_decay=wd, betas=[0.9, 0.95], decoupled_weight_decay=decoupled), 1.0)
    for (name, p), p0, gp in zip(model.named_parameters(), theta0.parameters(), g.parameters()):
        decayed = p.dim() >= 2
        if decoupled:
            expected = p0 * (1 - lr * wd if decayed else 1.0) - lr * gp.grad
        else:
            expected = p0 - lr * (gp.grad + (wd * p0 if decayed else 0.0))
        torch.testing.assert_close(p, expected, msg=name)


def first_step(cfg, grad_scale):
    """Parameters after one step from tiny_gpt() with the gradient set_grads(scale) gives."""
    model = tiny_gpt()
    opt = cfg.build(model)
    set_grads(model, grad_scale)
    opt.step()
    return model


def test_adamw_decay_is_decoupled():
    """AdamW's decay shrinks a >=2-D weight by exactly lr * wd * theta, whatever the gradient's scale (x1 or
    x1000), and never touches biases; the adaptive part is Adam's first step, lr * g / (|g| + eps)."""
    lr, wd, eps = 0.1, 0.5, 1e-8
    theta0, g = tiny_gpt(), tiny_gpt()
    set_grads(g)
    for scale in (1.0, 1000.0):
        with_decay = first_step(AdamWConfig(lr=lr, weight_decay=wd, eps=eps), scale)
        without = first_step(AdamWConfig(lr=lr, weight_decay=0.0, eps=eps), scale)
        for (name, p), p0, p_nodecay, gp in zip(
            with_decay.named_parameters(), theta0.parameters(), without.parameters(), g.parameters()
        ):
            decay = lr * wd * p0 if p.dim() >= 2 else torch.zeros_like(p0)
            torch.testing.assert_close(p - p_nodecay, -decay, msg=name)
            grad = scale * gp.grad
            torch.testing.assert_close(p, p0 - decay - lr * grad / (grad.abs() + eps), msg=name)


def test_adam_l2_is_coupled():
    """Adam's L2 is added to the gradient before the normalisation: the first step is
    lr * g' / (|g'| + eps) with g' = g + wd * theta; so its effect vanishes when the gradient is 1000x larger."""
    lr, wd, eps = 0.1, 0.5, 1e-8
    theta0, g = tiny_gpt(), tiny_gpt()
    set_grads(g)
    decay_effect = {}
    for scale in (1.0, 1000.0):
        with_l2 = first_step(AdamConfig(lr=lr, weight_decay=wd, eps=eps), scale)
        without = first_step(AdamConfig(lr=lr, weight_decay=0.0, eps=eps), scale)
        for (name, p), p0, gp in zip(with_l2.named_parameters(), theta0.parameters(), g.parameters()):
            coupled = scale * gp.grad + (wd * p0 if p.dim() >= 2 else 0.0)
            torch.testing.assert_close(p, p0 - lr * coupled / (coupled.abs() + eps), msg=name)
        w = "transformer.h.0.mlp.c_fc.weight"
        decay_effect[scale] = (with_l2.get_parameter(w) - without.get_parameter(w)).abs().mean().item()
    assert decay_effect[1.0] > 100 * decay_effect[1000.0]


def test_sgd_nesterov_with_coupled_l2():
    """SGD's first Nesterov step: buf = g', update = g' + momentum * buf, with g' = g + wd * theta."""
    lr, wd, mu = 0.5, 0.1, 0.9
    theta0, g = tiny_gpt(), tiny_gpt()
    set_grads(g)
    model = first_step(SGDConfig(lr=lr, weight_decay=wd, momentum=mu, nesterov=True), 1.0)
    for (name, p), p0, gp in zip(model.named_parameters(), theta0.parameters(), g.parameters()):
        coupled = gp.grad + (wd * p0 if p.dim() >= 2 else 0.0)
        torch.testing.assert_close(p, p0 - lr * (1 + mu) * coupled, msg=name)


# --- Muon + AdamW -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_muon_holds_only_the_hidden_matrices(tie_embeddings):
    model = tiny_gpt(tie_embeddings=tie_embeddings)
    opt = MuonConfig().build(model)
    hidden = [
        w
        for block in model.transformer.h
        for w in (block.attn.c_attn.weight, block.attn.c_proj.weight, block.mlp.c_fc.weight, block.mlp.c_proj.weight)
    ]
    muon_params = [p for g in opt.muon.param_groups for p in g["params"]]
    adamw_params = [p for g in opt.adamw.param_groups for p in g["params"]]
    assert ids(muon_params) == ids(hidden) == ids(hidden_matrices(model)) and len(muon_params) == len(hidden)
    assert ids(adamw_params) == ids(model.parameters()) - ids(hidden)
    assert len(adamw_params) + len(muon_params) == len(list(model.parameters()))
    heads = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight), id(model.lm_head.weight)}
    assert heads <= ids(adamw_params)
    assert all(g is h for g, h in zip(opt.param_groups, opt.muon.param_groups + opt.adamw.param_groups, strict=True))
    assert [g["name"] for g in opt.param_groups] == ["muon", "decay", "no_decay"]  # labels of the logged lr


MUON = MuonConfig(
    lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=False, ns_coefficients=[3.0, -3.2, 1.2], eps=1e-6,
    ns_steps=4, adjust_lr_fn="match_rms_adamw",
    adamw=MuonAdamWConfig(lr=0.01, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.2),
)  # fmt: skip  (every knob off its default, so that a dropped one shows)


def test_muon_steps_match_torch_muon_and_adamw():
    """Two steps of the combined optimizer equal torch.optim.Muon on the hidden matrices and torch.optim.AdamW
    on the rest, built directly with the same knobs."""
    model, ref = tiny_gpt(), tiny_gpt()
    opt = MUON.build(model)
    hidden = hidden_matrices(ref)
    ref_muon = torch.optim.Muon(
        hidden, lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=False, ns_coefficients=(3.0, -3.2, 1.2),
        eps=1e-6, ns_steps=4, adjust_lr_fn="match_rms_adamw",
    )  # fmt: skip
    rest = [p for p in ref.parameters() if id(p) not in ids(hidden)]
    matrices, vectors = [p for p in rest if p.dim() >= 2], [p for p in rest if p.dim() < 2]
    ref_adamw = torch.optim.AdamW(
        [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=0.01, betas=(0.8, 0.9), eps=1e-6,
        weight_decay=0.2,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in (1, 2):
        set_grads(model, seed=seed)
        set_grads(ref, seed=seed)
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert not torch.equal(p, before[name]), name
        torch.testing.assert_close(p, p_ref, rtol=0, atol=0, msg=name)


def test_muon_update_is_orthogonalised():
    """One Muon step on a matrix (no decay, no momentum history) moves it by lr * adjust * O, where O is the
    gradient orthogonalised: its singular values are all near 1 (Newton-Schulz is approximate: 0.5..1.5)."""
    model = tiny_gpt()
    opt = MuonConfig(lr=0.02).build(model)
    w = model.transformer.h[0].mlp.c_fc.weight  # (64, 16): adjust = sqrt(max(1, 64 / 16)) = 2
    w0 = w.detach().clone()
    set_grads(model)
    opt.step()
    update = (w0 - w.detach()) / (0.02 * 2.0)
    singular = torch.linalg.svdvals(update)
    grad_singular = torch.linalg.svdvals(w.grad)
    assert grad_singular.max() / grad_singular.min() > 1.5  # the gradient is far from orthogonal
    assert singular.min() > 0.5 and singular.max() < 1.5, singular


def test_muon_follows_an_lr_scheduler():
    """LambdaLR scales each group from its own lr (Muon's and AdamW's), and the inner optimizers step with it:
    at factor 0 nothing moves."""
    model = tiny_gpt()
    cfg = MuonConfig(weight_decay=0.1)
    opt = cfg.build(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 0.5, 0.0][min(step, 2)])
    set_grads(model)
    opt.step()
    sched.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.5 * cfg.lr)
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([0.5 * cfg.adamw.lr] * 2)
    opt.step()
    sched.step()
    frozen = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, p0 in zip(model.parameters(), frozen):
        torch.testing.assert_close(p, p0, rtol=0, atol=0)


def test_muon_state_dict_round_trip():
    """A fresh optimizer and scheduler loaded from a checkpoint continue exactly as the originals (Muon's
    momentum buffers and AdamW's moments restored into the inner optimizers). As in Lightning, the scheduler
    is built before the optimizer state is loaded, and must still reach both inner optimizers after it."""
    cfg = MuonConfig(weight_decay=0.1)
    halving = lambda step: 0.5**step  # noqa: E731

    def make(model):
        opt = cfg.build(model)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, halving)

    model = tiny_gpt()
    opt, sched = make(model)
    for seed in (1, 2):
        set_grads(model, seed=seed)
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    resumed_model = copy.deepcopy(model)
    resumed, resumed_sched = make(resumed_model)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    assert resumed.muon.state is resumed.state and resumed.adamw.state is resumed.state
    assert len(resumed.state) == len(list(model.parameters()))
    assert all(g is h for g, h in zip(resumed.param_groups, resumed.muon.param_groups + resumed.adamw.param_groups))
    for seed in (3, 4):
        for o, s, m in ((opt, sched, model), (resumed, resumed_sched, resumed_model)):
            set_grads(m, seed=seed)
            o.step()
            s.step()
    assert resumed.muon.param_groups[0]["lr"] == pytest.approx(cfg.lr * 0.5**4)
    assert resumed.adamw.param_groups[0]["lr"] == pytest.approx(cfg.adamw.lr * 0.5**4)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_muon_with_grad_scaler():
    """fp16-style loss scaling: GradScaler unscales every group of both inner optimizers, steps them, and an
    inf in a gradient AdamW holds skips the whole step (Muon's matrices too) and halves the scale."""
    model, ref = tiny_gpt(), tiny_gpt()
    opt, ref_opt = MuonConfig().build(model), MuonConfig().build(ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    scaler.scale(model(x, x)[1]).backward()
    ref(x, x)[1].backward()
    scaler.unscale_(opt)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    scaler.step(opt)
    scaler.update()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x, x)[1]).backward()
    model.transformer.wpe.weight.grad[0, 0] = float("inf")  # a parameter AdamW steps
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0
    for p, p0 in zip(model.parameters(), before):
        torch.testing.assert_close(p, p0, rtol=0, atol=0)


# --- config -----------------------------------------------------------------------------------------------

BAD_KNOBS = {
    "betas_above_one": (["optimizer.betas=[0.9,1.0]"], "optimizer.betas"),
    "one_beta": (["optimizer.betas=[0.9]"], "optimizer.betas"),
    "zero_eps": (["optimizer.eps=0"], "optimizer.eps"),
    "negative_weight_decay": (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    "adam_negative_lr": (["optimizer=adam", "optimizer.lr=-1"], "optimizer.lr"),
    "sgd_negative_momentum": (["optimizer=sgd", "optimizer.momentum=-0.5"], "optimizer.momentum"),
    "sgd_nesterov_without_momentum": (["optimizer=sgd", "optimizer.momentum=0"], "optimizer.nesterov"),
    "sgd_nesterov_with_dampening": (["optimizer=sgd", "optimizer.dampening=0.5"], "optimizer.nesterov"),
    "sgd_has_no_betas": (["optimizer=sgd", "+optimizer.betas=[0.9,0.9]"], "optimizer.betas"),
    "rmsprop_alpha": (["optimizer=rmsprop", "optimizer.alpha=1.5"], "optimizer.alpha"),
    "adagrad_lr_decay": (["optimizer=adagrad", "optimizer.lr_decay=-1"], "optimizer.lr_decay"),
    "muon_momentum_one": (["optimizer=muon", "optimizer.momentum=1.0"], "optimizer.momentum"),
    "muon_ns_steps": (["optimizer=muon", "optimizer.ns_steps=0"], "optimizer.ns_steps"),
    "muon_ns_coefficients": (["optimizer=muon", "optimizer.ns_coefficients=[3.4,-4.7]"], "optimizer.ns_coefficients"),
    "muon_adjust_lr_fn": (["optimizer=muon", "optimizer.adjust_lr_fn=sqrt"], "optimizer.adjust_lr_fn"),
    "muon_adamw_lr": (["optimizer=muon", "optimizer.adamw.lr=0"], "optimizer.adamw.lr"),
    "muon_adamw_betas": (["optimizer=muon", "optimizer.adamw.betas=[1.0,0.9]"], "optimizer.adamw.betas"),
    "muon_adamw_unknown": (["optimizer=muon", "+optimizer.adamw.momentum=0.9"], "optimizer.adamw.momentum"),
}


@pytest.mark.parametrize("case", sorted(BAD_KNOBS))
def test_bad_optimizer_knob_names_the_key(case):
    overrides, key = BAD_KNOBS[case]
    with pytest.raises(ConfigError) as err:
        load_config(compose_train(overrides))
    assert err.value.key == key, str(err.value)


# --- end to end -------------------------------------------------------------------------------------------


def test_muon_trains_and_resumes_through_lightning(tmp_path, data_dir):
    """optimizer=muon through the real training path: it learns, its checkpoint holds both inner optimizers'
    state, and resuming from step 1 ends where the uninterrupted run does."""
    overrides = ["debug=smoke", "logger=none", "optimizer=muon", "eval.hellaswag.enabled=false"]
    straight = tmp_path / "straight"
    summary = run(compose_train(overrides, straight, data_dir))
    assert summary["status"] == "completed" and summary["step"] == 2
    assert summary["val_loss"] < summary["val_loss_initial"]
    ckpt = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (saved,) = ckpt["optimizer_states"]
    assert len(saved["param_groups"]) == 3 and "ns_steps" in saved["param_groups"][0]
    kinds = {frozenset(s) for s in saved["state"].values()}
    assert {"momentum_buffer"} in kinds and {"step", "exp_avg", "exp_avg_sq"} in kinds

    middle = straight / "checkpoints" / "step_000001.ckpt"
    resumed = run(compose_train([*overrides, f"ckpt_path={middle}"], tmp_path / "resumed", data_dir))
    assert resumed["step"] == 2 and resumed["train_loss"] == summary["train_loss"]
    assert resumed["val_loss"] == summary["val_loss"]
