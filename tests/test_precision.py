"""The precision group: each option maps to Lightning's flag; fp16 scales the loss and skips an overflowing step
as GradScaler does (weights and optimizer state untouched, scale halved); bf16 and pure bf16 train on CPU."""

import math

import pytest
import torch

from gptlab.config import load_config
from gptlab.module import GPTModule
from gptlab.train import run
from tests.conftest import compose_train, read_metrics

# A few CPU-cheap steps of a narrow model: fp16 and bf16 matmuls on CPU are many times slower than fp32.
TINY = [
    "debug=smoke", "logger=none", "eval.hellaswag.enabled=false",
    "data.seq_len=16", "data.micro_batch_size=2", "global_batch_tokens=32", "eval.val_tokens=64",
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
]  # fmt: skip


def checkpoint(run_dir, step=None):
    """The run's checkpoint of `step`; None: last.ckpt (written after the last step)."""
    name = "last.ckpt" if step is None else f"step_{step:06d}.ckpt"
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_precision_options_map_to_lightning():
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gptlab.fit import _precision_args

    expected = {
        "fp32": ("32-true", "highest"),
        "tf32": ("32-true", "high"),
        "bf16": ("bf16-mixed", "high"),
        "fp16": ("16-mixed", "high"),
        "bf16_true": ("bf16-true", "high"),
    }
    for name, (flag, matmul) in expected.items():
        cfg, _ = load_config(compose_train([f"precision={name}", "trainer.accelerator=cpu"]))
        assert (cfg.precision.trainer_precision, cfg.precision.matmul_precision) == (flag, matmul)
        args = _precision_args(cfg)
        if name == "fp16":  # real fp16 on CPU: Lightning's own "16-mixed" would quietly run bf16 there
            (plugin,) = args["plugins"]
            assert isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed"
            assert plugin.device == "cpu" and isinstance(plugin.scaler, torch.amp.GradScaler)
        else:
            assert args == {"precision": flag}


def inject_inf_gradient(monkeypatch, at_step: int) -> None:
    """An fp16 overflow on demand: an inf in one (scaled) gradient during the given optimizer step."""

    def on_after_backward(self):
        if self.global_step + 1 == at_step:
            self.model.transformer.wpe.weight.grad[0, 0] = math.inf

    monkeypatch.setattr(GPTModule, "on_after_backward", on_after_backward, raising=False)


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, data_dir, monkeypatch):
    inject_inf_gradient(monkeypatch, at_step=2)
    run_dir = tmp_path / "fp16"
    summary = run(compose_train([*TINY, "precision=fp16", "max_tokens=96"], run_dir, data_dir))
    # An overflow is no NaN event: on_nan=stop (the default) does not stop the run.
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["val_loss"] < summary["val_loss_initial"]

    train = {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}
    assert [train[s]["loss_scale"] for s in (1, 2, 3)] == [2.0**16, 2.0**16, 2.0**15]  # halved after step 2
    assert [train[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert train[2]["grad_norm"] == math.inf and math.isfinite(train[3]["grad_norm"])
    assert "nan_skipped" not in train[2]

    one, two, three = checkpoint(run_dir, 1), checkpoint(run_dir, 2), checkpoint(run_dir)
    assert_same_tensors(one["state_dict"], two["state_dict"])  # step 2 changed no weight
    state_one, state_two = one["optimizer_states"][0]["state"], two["optimizer_states"][0]["state"]
    assert state_one.keys() == state_two.keys()
    for p in state_one:  # nor Adam's moments and step counts
        assert_same_tensors(state_one[p], state_two[p])
    wpe = "model.transformer.wpe.weight"
    assert not torch.equal(two["state_dict"][wpe], three["state_dict"][wpe])  # step 3 did train
    assert [c["MixedPrecision"]["scale"] for c in (one, two, three)] == [2.0**16, 2.0**15, 2.0**15]


def test_fp16_with_a_fused_optimizer_measures_and_clips_unscaled_gradients(tmp_path, data_dir):
    """A fused AdamW unscales inside its step, so Lightning leaves the gradients scaled; the monitor unscales
    them first, or the logged norm and the clipping would be 65536 times off. (The weights cannot tell:
    Adam's update hardly depends on the gradient's scale.)"""
    norms = {}
    for fused in ("true", "false"):
        run_dir = tmp_path / f"fused_{fused}"
        overrides = [*TINY, "precision=fp16", "max_tokens=64", "eval.at_start=false", f"optimizer.fused={fused}"]
        summary = run(compose_train(overrides, run_dir, data_dir))
        assert summary["status"] == "completed"
        norms[fused] = [m["grad_norm"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert norms["true"] == pytest.approx(norms["false"], rel=1e-4)
    assert 1.0 < norms["false"][0] < 100.0  # an unscaled norm, above grad_clip=1: clipping was active


@pytest.mark.parametrize("precision,weight_dtype", [("bf16", torch.float32), ("bf16_true", torch.bfloat16)])
def test_bf16_mixed_and_pure_bf16_train_on_cpu(tmp_path, data_dir, precision, weight_dtype):
    run_dir = tmp_path / precision
    summary = run(compose_train([*TINY, f"precision={precision}", "max_tokens=96"], run_dir, data_dir))
    assert summary["status"] == "completed" and summary["step"] == 3
    assert summary["val_loss"] < summary["val_loss_initial"]
    assert not any("loss_scale" in m for m in read_metrics(run_dir))  # bf16 needs no loss scaling
    ckpt = checkpoint(run_dir)
    assert {w.dtype for w in ckpt["state_dict"].values()} == {weight_dtype}  # bf16-mixed keeps fp32 weights
    moments = [s["exp_avg"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert {m.dtype for m in moments} == {weight_dtype}
