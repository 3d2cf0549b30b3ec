"""The debug presets (conf/debug/): each composes and runs through the real entry point, and does what it says."""

import json

import lightning as L
import pytest
import torch

import gptlab.fit
from gptlab.config import ConfigError, load_config
from gptlab.train import run
from tests.conftest import compose_train, read_metrics
from tests.test_hellaswag import make_records, write_jsonl

# A 3M-parameter model (most of it the 50304-token embedding) on micro-batches of 2 x 16 tokens.
TINY = [
    "logger=none", "callbacks.progress_bar_refresh_rate=0", "model.n_layer=2", "model.n_head=2", "model.n_embd=64",
    "data.seq_len=16", "data.micro_batch_size=2", "eval.val_tokens=32",
]  # fmt: skip


def train_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def add_callback(monkeypatch, callback: L.Callback) -> None:
    """Train with one more callback, next to those fit.py builds."""
    build = gptlab.fit.build_callbacks
    monkeypatch.setattr(gptlab.fit, "build_callbacks", lambda *args: [*build(*args), callback])


def test_overfit_memorises_one_batch_and_stops_below_the_threshold(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    overrides = ["debug=overfit", *TINY, "global_batch_tokens=32", "trainer.max_steps=150"]
    summary = run(compose_train(overrides, run_dir, data_dir))
    losses = train_losses(run_dir)
    steps = sorted(losses)
    assert steps == list(range(1, len(steps) + 1))  # logged every step
    last = steps[-1]
    assert summary["status"] == "completed" and summary["step"] == last < 150  # stopped before the cap...
    assert losses[last] < 0.1 and all(losses[s] >= 0.1 for s in steps[:-1])  # ...at the first step below 0.1
    assert summary["train_loss"] == losses[last]
    # memorised, not learned: the held-out loss is far above the training loss (it rises as the batch is learned)
    assert summary["val_loss"] > 1.0
    assert [m["stopping_threshold_reached"] for m in read_metrics(run_dir) if "stopping_threshold_reached" in m] == [1]
    assert f"train/loss {losses[last]:.4f} < 0.1 at step {last}; stopping" in capsys.readouterr().out


def test_overfit_preset_has_no_regularization_and_a_step_cap():
    cfg, plan = load_config(compose_train(["debug=overfit"]))
    m = cfg.model
    assert (m.embd_dropout, m.attn_dropout, m.resid_dropout, m.label_smoothing) == (0, 0, 0, 0)
    assert cfg.optimizer.weight_decay == 0 and cfg.scheduler.name == "constant"
    assert cfg.data.overfit_batches == 1 and plan.grad_accum == 1
    assert cfg.trainer.stopping_threshold == 0.1 and plan.total_steps == cfg.trainer.max_steps
    # the group override of a preset stays overridable from the command line
    assert load_config(compose_train(["debug=overfit", "scheduler=cosine"]))[0].scheduler.name == "cosine"


def test_overfit_serves_the_same_micro_batch_every_step(tmp_path, data_dir, monkeypatch):
    seen = []

    class Batches(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].clone())

    add_callback(monkeypatch, Batches())
    overrides = ["debug=overfit", *TINY, "global_batch_tokens=64", "trainer.max_steps=2", "eval.at_start=false"]
    with pytest.warns(UserWarning, match=r"never fell below trainer.stopping_threshold=0.1 in 2 steps"):
        run(compose_train(overrides, tmp_path / "run", data_dir))
    assert len(seen) == 4  # 2 steps x 2 micro-steps, all the first micro-batch of the run
    assert all(torch.equal(batch, seen[0]) for batch in seen)
    metrics = read_metrics(tmp_path / "run")
    assert [m["stopping_threshold_reached"] for m in metrics if "stopping_threshold_reached" in m] == [0]

    seen.clear()  # without overfit_batches the loader moves on
    plain = [*overrides, "data.overfit_batches=0", "trainer.stopping_threshold=null"]
    run(compose_train(plain, tmp_path / "plain", data_dir))
    assert len(seen) == 4 and not torch.equal(seen[1], seen[0])


def test_fast_runs_a_few_steps_of_everything(tmp_path, data_dir):
    hellaswag = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_records(20))
    run_dir = tmp_path / "run"
    summary = run(compose_train(["debug=fast", "logger=none", f"eval.hellaswag.path={hellaswag}"], run_dir, data_dir))
    assert summary["status"] == "completed" and summary["step"] == 3
    metrics = read_metrics(run_dir)
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert [m["step"] for m in metrics if "val/loss" in m] == [0, 2, 3]  # at the start, every 2 steps, the end
    scored = [m for m in metrics if "hellaswag/acc_norm" in m]
    assert [m["step"] for m in scored] == [2, 3]  # every 2 steps and the end, each once
    assert summary["hellaswag_n"] == 16 and scored[-1]["hellaswag/acc_norm"] == summary["hellaswag_acc_norm"]
    assert summary["val_loss"] < summary["val_loss_initial"]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step_000002.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3


def test_profile_writes_a_chrome_trace_of_the_active_steps(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "run"
    overrides = ["debug=profile", *TINY, "global_batch_tokens=32", "callbacks.profiler.row_limit=5"]
    summary = run(compose_train(overrides, run_dir, data_dir))
    assert summary["status"] == "completed" and summary["step"] == 4  # wait 1 + warmup 1 + active 2
    trace = json.loads((run_dir / "profile" / "trace_rank0.json").read_text())  # valid JSON, Chrome trace format
    events = trace["traceEvents"]
    # the profiler numbers its steps from 0: steps 0 (wait) and 1 (warmup) are not in the trace
    names = {e.get("name", "") for e in events}
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert {"aten::mm", "aten::scaled_dot_product_attention"} <= names  # forward and backward ops of the GPT
    assert any(name.startswith("Optimizer.step#") for name in names)
    out = capsys.readouterr().out
    table = (run_dir / "profile" / "top_ops.txt").read_text()
    assert "profiler: steps 3-4 traced into" in out and table in out and "aten::mm" in table
    rules = [i for i, line in enumerate(table.splitlines()) if line.startswith("---")]
    assert len(rules) == 3 and rules[2] - rules[1] - 1 == 5  # row_limit rows between the header and the total


def test_profiler_knobs_are_validated():
    with pytest.raises(ConfigError, match=r"callbacks.profiler.active: must be >= 1"):
        load_config(compose_train(["debug=profile", "callbacks.profiler.active=0"]))
    with pytest.raises(ConfigError, match=r"callbacks.profiler.sort_by: unknown option 'cpu_time'"):
        load_config(compose_train(["callbacks.profiler.sort_by=cpu_time"]))
    with pytest.raises(ConfigError, match=r"trainer.stopping_threshold: must be null or > 0"):
        load_config(compose_train(["trainer.stopping_threshold=0"]))
    with pytest.raises(ConfigError, match=r"data.overfit_batches: must be >= 0"):
        load_config(compose_train(["data.overfit_batches=-1"]))


class AnomalyProbe(L.Callback):
    """Records whether autograd anomaly detection is on during training; optionally makes backward produce NaN."""

    def __init__(self, nan_backward: bool = False):
        self.enabled: list[bool] = []
        self.nan_backward = nan_backward

    def on_train_start(self, trainer, pl_module):
        if self.nan_backward:  # 0 * sqrt(0): a finite forward (0) whose backward is 0 / (2 sqrt(0)) = NaN
            pl_module.model.register_forward_hook(lambda m, args, out: (out[0], out[1] + 0 * (0 * out[1]).sqrt()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.enabled.append(torch.is_anomaly_enabled())


def test_anomaly_turns_on_anomaly_detection_and_names_the_nan_op(tmp_path, data_dir, monkeypatch):
    overrides = [
        *TINY, "global_batch_tokens=32", "max_tokens=32", "scheduler.warmup_steps=0",
        "eval.at_start=false", "eval.hellaswag.enabled=false",
    ]  # fmt: skip
    plain = AnomalyProbe()
    add_callback(monkeypatch, plain)
    run(compose_train(overrides, tmp_path / "plain", data_dir))
    assert plain.enabled == [False]

    probe = AnomalyProbe(nan_backward=True)
    add_callback(monkeypatch, probe)
    with pytest.warns(UserWarning, match=r"(?s)Error detected in SqrtBackward0.*Traceback of forward call"):
        with pytest.raises(RuntimeError, match=r"Function 'SqrtBackward0' returned nan values"):
            run(compose_train(["debug=anomaly", *overrides], tmp_path / "anomaly", data_dir))
    assert probe.enabled == [True]
    summary = json.loads((tmp_path / "anomaly" / "summary.json").read_text())
    assert summary["status"] == "failed" and "SqrtBackward0" in summary["error"]
