"""The optimizer step lives in GPTModule alone: with any one of the run's callbacks removed, a NaN loss stops the
run at its step, on_nan=skip drops exactly that update, an fp16 overflow is skipped with the scale halved, and
clipping scales the gradients to grad_clip from the norm the module measured.

Each scenario trains a tiny GPT for a few steps with the callbacks of gptlab.fit, and again with each of them
removed in turn; an observer callback (it reads, never writes) records every step. All variants must agree
to the bit: no callback hands the step anything."""

import math

import lightning as L
import pytest
import torch

from gptlab.callbacks.summary import RunSummary
from gptlab.config import load_config
from gptlab.data.datamodule import TokenDataModule
from gptlab.fit import build_callbacks, build_trainer
from gptlab.model import GPT
from gptlab.module import GPTModule, NonFiniteLossError
from tests.conftest import compose_train
from tests.test_monitor import FAST


class Observer(L.Callback):
    """Per optimizer step: the norm of the gradients the module received, the norm of those the optimizer
    stepped with (None: no gradients), the module's step_stats and step_outcome, and the weights after it."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._after_update)  # the gradients it stepped with

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # callbacks run before the module
        self.steps.append({"received_norm": _norm(pl_module.parameters())})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.steps and len(self.steps) == trainer.global_step and "weights" not in self.steps[-1]:  # stepped
            self.steps[-1] |= {
                "stats": dict(pl_module.step_stats),
                "outcome": pl_module.step_outcome,
                "weights": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
            }

    def _after_update(self, optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.steps[-1]["stepped_norm"] = _norm(params)


def _norm(params) -> float | None:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else None


def poison(monkeypatch, micro_step: int, how: str) -> list:
    """On training forward pass `micro_step` (1-based; 2 per optimizer step) of every run: a NaN loss, or
    (how="inf_grad") an infinite gradient flowing back from the logits with a finite loss. Returns the count of
    forward passes, which each run starts by clearing."""
    forward, calls = GPT.forward, []

    def poisoned(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training and loss is not None:
            calls.append(1)
            if len(calls) == micro_step and how == "nan":
                loss = loss * math.nan
            elif len(calls) == micro_step:
                logits.register_hook(lambda g: g.index_fill(-1, torch.tensor([0]), math.inf))
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    return calls


def train(overrides, tmp_path, data_dir, drop: int | None, forward_passes: list) -> tuple[list[dict], Exception | None]:
    """Fit with fit.py's callbacks (and RunSummary), the one at index `drop` left out; the observed steps."""
    forward_passes.clear()
    cfg, plan = load_config(compose_train([*FAST, "trainer.max_steps=3", "max_tokens=null", *overrides],
                                          tmp_path / f"run{drop}", data_dir))  # fmt: skip
    torch.manual_seed(cfg.seed)
    callbacks = build_callbacks(cfg, plan, tmp_path / f"run{drop}")
    callbacks.append(RunSummary(tmp_path / f"run{drop}", 0.0, cfg.seed, plan.tokens_per_step))
    kept = [c for i, c in enumerate(callbacks) if i != drop]
    observer = Observer()
    trainer = build_trainer(cfg, plan, tmp_path / f"run{drop}", [], [*kept, observer])
    error = None
    try:
        trainer.fit(GPTModule(cfg, plan), datamodule=TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed))
    except NonFiniteLossError as e:
        error = e
    return observer.steps, error


def every_variant(overrides, tmp_path, data_dir, forward_passes: list):
    """The observed steps of the full run, and of the run without each callback in turn, by callback name."""
    cfg, plan = load_config(compose_train([*FAST, *overrides], tmp_path, data_dir))
    names = [type(c).__name__ for c in build_callbacks(cfg, plan, tmp_path)] + ["RunSummary"]
    full = train(overrides, tmp_path, data_dir, None, forward_passes)
    return full, {name: train(overrides, tmp_path, data_dir, i, forward_passes) for i, name in enumerate(names)}


def assert_same(full, variants):
    steps, error = full
    for name, (other_steps, other_error) in variants.items():
        assert str(other_error) == str(error), name
        assert len(other_steps) == len(steps), name
        for mine, theirs in zip(steps, other_steps):
            assert mine.keys() == theirs.keys() and mine.get("outcome") == theirs.get("outcome"), name
            assert all(same(v, theirs["stats"][k]) for k, v in mine.get("stats", {}).items()), name
            assert same(mine["received_norm"], theirs["received_norm"]), name
            assert same(mine.get("stepped_norm"), theirs.get("stepped_norm")), name
            assert all(torch.equal(w, theirs["weights"][k]) for k, w in mine.get("weights", {}).items()), name


def same(a: float | None, b: float | None) -> bool:
    """Equal, NaN counting as equal to NaN."""
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


def unchanged(before: dict, after: dict) -> bool:
    return all(torch.equal(w, after[k]) for k, w in before.items())


def test_clipping_and_nan_skip_without_any_one_callback(tmp_path, data_dir, monkeypatch, one_thread):
    """fp32, grad_clip=0.05 (below every step's norm), a NaN loss in step 2 under on_nan=skip."""
    passes = poison(monkeypatch, micro_step=3, how="nan")
    full, variants = every_variant(["grad_clip=0.05", "on_nan=skip"], tmp_path, data_dir, passes)
    steps, error = full
    assert error is None and [s["outcome"] for s in steps] == ["applied", "nan_skipped", "applied"]
    for s in (steps[0], steps[2]):  # clipped from the norm the module measured, once
        assert s["stats"]["grad_norm"] == pytest.approx(s["received_norm"], rel=1e-6) and s["received_norm"] > 0.05
        assert s["stepped_norm"] == pytest.approx(0.05, rel=1e-4)
    assert math.isnan(steps[1]["stats"]["loss"]) and steps[1]["stepped_norm"] is None  # no gradients: no update
    assert unchanged(steps[0]["weights"], steps[1]["weights"]) and not unchanged(steps[1]["weights"], steps[2]["weights"])
    assert_same(full, variants)


def test_nan_stop_without_any_one_callback(tmp_path, data_dir, monkeypatch, one_thread):
    passes = poison(monkeypatch, micro_step=3, how="nan")
    full, variants = every_variant([], tmp_path, data_dir, passes)
    steps, error = full
    assert isinstance(error, NonFiniteLossError) and "non-finite loss at step 2" in str(error)
    assert [s.get("outcome") for s in steps] == ["applied", None]  # step 2 raised before its update
    assert "stepped_norm" not in steps[1]
    assert_same(full, variants)


def test_fp16_overflow_skip_without_any_one_callback(tmp_path, data_dir, monkeypatch, one_thread):
    passes = poison(monkeypatch, micro_step=3, how="inf_grad")
    full, variants = every_variant(["precision=fp16"], tmp_path, data_dir, passes)
    steps, error = full
    assert error is None and [s["outcome"] for s in steps] == ["applied", "overflow", "applied"]
    assert math.isfinite(steps[1]["stats"]["loss"]) and not math.isfinite(steps[1]["stats"]["grad_norm"])
    assert [s["stats"]["loss_scale"] for s in steps] == [2.0**16, 2.0**16, 2.0**15]  # halved after step 2
    assert unchanged(steps[0]["weights"], steps[1]["weights"]) and not unchanged(steps[1]["weights"], steps[2]["weights"])
    assert_same(full, variants)
