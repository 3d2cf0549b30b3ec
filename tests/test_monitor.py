"""Training-dynamics monitoring: update-to-data ratios and norms equal their definitions, loss spikes are caught
without false alarms, and a NaN loss either stops the run at its step (nothing NaN saved) or skips the update."""

import json
import math
import warnings

import pytest
import torch

from gptlab.callbacks.config import LossSpikeConfig, MonitorConfig
from gptlab.callbacks.monitor import TrainingMonitor, layers, snapshot, update_ratios
from gptlab.config import load_config
from gptlab.errors import ConfigError
from gptlab.model import GPT, GPTConfig
from gptlab.module import NonFiniteLossError
from gptlab.pretrained import load_gpt
from gptlab.train import run
from tests.conftest import compose_train, read_metrics

# 2 micro-steps of 2 x 16 tokens per optimizer step (the loss is a mean over micro-steps), on a narrow model.
FAST = [
    "debug=smoke", "logger=none", "eval.hellaswag.enabled=false", "eval.at_start=false",
    "data.seq_len=16", "data.micro_batch_size=2", "global_batch_tokens=64", "eval.val_tokens=64",
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
]  # fmt: skip


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32))


def test_update_ratio_is_update_norm_over_weight_norm():
    model = tiny_gpt()
    grouped = layers(model)
    assert {"wte", "wpe", "ln_f", "h.0.attn.c_attn", "h.1.mlp.c_proj"} <= set(grouped)
    assert "lm_head" not in grouped  # tied to wte: counted once
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = snapshot(model)
    lr = 1e-2
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    x = torch.randint(0, 64, (4, 16))
    _, loss = model(x, x.roll(-1, dims=1))
    loss.backward()
    optimizer.step()
    ratios = update_ratios(layers(model), before)

    now = dict(model.named_parameters())

    def by_hand(names):
        delta = sum(((now[n].detach() - initial[n]) ** 2).sum() for n in names)
        weight = sum((initial[n] ** 2).sum() for n in names)
        return math.sqrt(delta / weight)

    c_attn = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"]
    assert ratios["update_ratio/h.0.attn.c_attn"].item() == pytest.approx(by_hand(c_attn), rel=1e-5)
    assert ratios["update_ratio/global"].item() == pytest.approx(by_hand(list(now)), rel=1e-5)
    per_layer = [v.item() for k, v in ratios.items() if k not in ("update_ratio/global", "update_ratio/max")]
    assert len(per_layer) == len(grouped) and ratios["update_ratio/max"].item() == max(per_layer)
    # Adam's first step moves every weight that has a gradient by lr (m / sqrt(v) = sign(g)): a closed form.
    wpe = initial["transformer.wpe.weight"]  # all 16 positions are used, so every entry has a gradient
    assert ratios["update_ratio/wpe"].item() == pytest.approx(lr * math.sqrt(wpe.numel()) / wpe.norm().item(), rel=1e-3)


def test_logged_norms_and_ratios_match_the_checkpoints(tmp_path, data_dir):
    """param_norm at step s is |theta_s|, update_ratio at step s is |theta_s - theta_{s-1}| / |theta_{s-1}|,
    both computed here from the run's own checkpoints."""
    run_dir = tmp_path / "run"
    run(compose_train([*FAST, "max_tokens=192", "callbacks.monitor.every_n_steps=1"], run_dir, data_dir))
    metrics = read_metrics(run_dir)
    train = {m["step"]: m for m in metrics if "train/loss" in m}
    assert sorted(train) == [1, 2, 3]
    assert all(m["grad_norm"] > 0 and m["lr"] > 0 and m["loss_spikes"] == 0 for m in train.values())
    assert all("nan_skipped" not in m for m in train.values())  # counted only under on_nan=skip
    weights = {m["step"]: m for m in metrics if "param_norm" in m}
    assert sorted(weights) == [1, 2, 3]

    ckpt = run_dir / "checkpoints"
    files = {1: "step_000001.ckpt", 2: "step_000002.ckpt", 3: "last.ckpt"}
    models = {s: load_gpt(ckpt / name) for s, name in files.items()}
    params = {s: {n: p.detach().double() for n, p in m.named_parameters()} for s, m in models.items()}  # tied once

    def norm(tensors) -> float:
        return torch.cat([t.flatten() for t in tensors]).norm().item()

    # rel=1e-3: the float32 norm of the 6.4M-entry embedding is off by ~2e-4 on CPU; a step apart is ~1e-2.
    for s in (1, 2, 3):
        assert weights[s]["param_norm"] == pytest.approx(norm(params[s].values()), rel=1e-3)
    for s in (2, 3):
        new, old = params[s], params[s - 1]
        ratio = norm(new[n] - old[n] for n in new) / norm(old.values())
        assert weights[s]["update_ratio/global"] == pytest.approx(ratio, rel=1e-3)
        fc = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
        ratio = norm(new[n] - old[n] for n in fc) / norm(old[n] for n in fc)
        assert weights[s]["update_ratio/h.0.mlp.c_fc"] == pytest.approx(ratio, rel=1e-4)


def test_loss_spike_fires_on_a_spike_and_not_on_a_smooth_curve():
    monitor = TrainingMonitor(MonitorConfig(loss_spike=LossSpikeConfig(window=50, k=4.0, min_steps=20)), on_nan="stop")
    noise = torch.randn(400, generator=torch.Generator().manual_seed(0)) * 0.02
    curve = [3.0 + 5.0 * math.exp(-t / 60) + noise[t].item() for t in range(400)]  # a noisy, decaying loss
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert not any(monitor.check_loss_spike(t + 1, loss) for t, loss in enumerate(curve))
    assert monitor.counts["loss_spikes"] == 0
    with pytest.warns(UserWarning, match="loss spike at step 401"):
        assert monitor.check_loss_spike(401, curve[-1] + 0.5)
    assert monitor.counts["loss_spikes"] == 1
    assert not monitor.check_loss_spike(402, curve[-1])
    assert not monitor.check_loss_spike(403, math.nan)  # a NaN is the NaN guard's business

    early = TrainingMonitor(MonitorConfig(loss_spike=LossSpikeConfig(window=50, k=4.0, min_steps=20)), on_nan="stop")
    assert not any(early.check_loss_spike(t, loss) for t, loss in enumerate([3.0] * 10 + [30.0]))  # < min_steps


def test_monitor_config_errors_name_the_key():
    for overrides, key in [
        (["on_nan=ignore"], "on_nan"),
        (["callbacks.monitor.every_n_steps=0"], "callbacks.monitor.every_n_steps"),
        (["callbacks.monitor.loss_spike.min_steps=80"], "callbacks.monitor.loss_spike.min_steps"),
        (["callbacks.monitor.loss_spike.k=0"], "callbacks.monitor.loss_spike.k"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(compose_train(overrides))
        assert err.value.key == key


def poison_loss(monkeypatch, micro_steps: set[int]) -> None:
    """NaN training loss on the given training forward passes (1-based; 2 per optimizer step in FAST)."""
    forward, calls = GPT.forward, []

    def forward_with_nan(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training and loss is not None:
            calls.append(1)
            if len(calls) in micro_steps:
                loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_with_nan)


def test_nan_loss_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    poison_loss(monkeypatch, {3})  # the first micro-step of optimizer step 2
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 2"):
        run(compose_train([*FAST, "max_tokens=192"], run_dir, data_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and "non-finite loss at step 2" in summary["error"]
    assert max(m["step"] for m in read_metrics(run_dir) if "train/loss" in m) == 1  # stopped within the step

    on_disk = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert "step_000001.ckpt" in {c.name for c in on_disk}
    for path in on_disk:  # step 1's, and last.ckpt is step 1's too: nothing after the NaN was saved
        assert torch.load(path, map_location="cpu", weights_only=True)["global_step"] == 1
        model = load_gpt(path)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_loss_with_on_nan_skip_drops_that_update_and_counts_it(tmp_path, data_dir, monkeypatch):
    poison_loss(monkeypatch, {3})
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-finite loss or gradients at step 2: update skipped"):
        summary = run(compose_train([*FAST, "max_tokens=192", "on_nan=skip"], run_dir, data_dir))
    assert summary["status"] == "completed" and summary["step"] == 3
    train = {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}
    assert [train[s]["nan_skipped"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(train[2]["train/loss"]) and math.isfinite(train[3]["train/loss"])

    ckpts = [torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)
             for name in ("step_000001.ckpt", "step_000002.ckpt", "last.ckpt")]  # fmt: skip
    one, two, three = ckpts
    for key, w in one["state_dict"].items():  # the skipped step changed no weight
        assert torch.equal(two["state_dict"][key], w), key
    state_one, state_two = one["optimizer_states"][0]["state"], two["optimizer_states"][0]["state"]
    for p, state in state_one.items():  # nor the optimizer's state
        assert all(torch.equal(state_two[p][k], v) for k, v in state.items()), p
    assert three["global_step"] == 3
    assert all(torch.isfinite(w).all() for w in three["state_dict"].values())
    wpe = "model.transformer.wpe.weight"
    assert not torch.equal(three["state_dict"][wpe], two["state_dict"][wpe])  # step 3 did train
