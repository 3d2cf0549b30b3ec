"""Training end to end: a single batch can be overfit, every precision trains, and the real entry point
produces a complete run folder."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gptlab.data.loader import TokenWindows
from gptlab.data.tokenizer import EOT
from gptlab.model import GPT, GPTConfig
from gptlab.optim import AdamWConfig
from gptlab.pretrained import load_gpt
from gptlab.train import run
from tests.conftest import ROOT, compose_train, read_metrics


def test_overfits_a_single_batch():
    """Debugging by overfitting: a model that cannot memorise one batch has a bug."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    opt = AdamWConfig(lr=3e-3, weight_decay=0.0).build(model)
    x = torch.randint(0, 64, (4, 32))
    y = torch.randint(0, 64, (4, 32))
    for step in range(300):
        _, loss = model(x, y)
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step} steps"


def test_logged_metrics_follow_optimizer_steps(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    summary = run(compose_train(["debug=smoke", "logger=none", "max_tokens=2048"], run_dir, data_dir))
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert [m["tokens"] for m in train] == [512, 1024, 1536, 2048]
    assert all(m["grad_norm"] > 0 and m["lr"] > 0 for m in train)
    assert [m["step"] for m in metrics if "val/loss" in m] == [0, 2, 4]
    assert summary["train_loss"] == train[-1]["train/loss"] and summary["tokens"] == 2048


def test_val_bpb_equals_bits_over_the_decoded_bytes_of_the_targets(tmp_path, data_dir, tiktoken_gpt2):
    """val/bpb: the validation targets' cross-entropy in bits over their UTF-8 bytes, <|endoftext|> (no text)
    left out of both; recomputed here from the final weights and tiktoken's own decoding of the targets."""
    run_dir = tmp_path / "run"
    summary = run(compose_train(["debug=smoke", "logger=none", "eval.val_tokens=512"], run_dir, data_dir))
    model = load_gpt(run_dir / "checkpoints" / "last.ckpt").eval()
    x, y = TokenWindows(data_dir / "sample", "val", 64).get(np.arange(512 // 64))
    with torch.no_grad():
        losses = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="none")
    text = y.flatten() != EOT
    n_bytes = len(tiktoken_gpt2.decode_bytes(y.flatten()[text].tolist()))
    assert (y == EOT).any() and n_bytes > 2 * text.sum()  # documents end inside the windows; tokens of ~4 bytes
    assert summary["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert summary["val_bpb"] == pytest.approx(losses[text].sum().item() / math.log(2) / n_bytes, rel=1e-5)
    logged = [m for m in read_metrics(run_dir) if "val/bpb" in m]
    assert [m["step"] for m in logged] == [0, 2] and logged[-1]["val/bpb"] == summary["val_bpb"]
    assert summary["val_bpb_initial"] == logged[0]["val/bpb"] > summary["val_bpb"]


def test_gradient_accumulation_equals_one_large_batch(tmp_path, data_dir):
    """4 micro-batches of 2 sequences give the update of 1 batch of 8 (same sequences), and the logged loss is
    the mean over micro-steps. Plain SGD without clipping, so the update is lr x gradient: a gradient summed
    instead of averaged over micro-steps would show 4x in the weights (Adam's first step would hide it)."""
    common = [
        "debug=smoke", "logger=none", "eval.at_start=false", "eval.hellaswag.enabled=false",
        "data.seq_len=64", "global_batch_tokens=512", "max_tokens=512", "grad_clip=0",
        "optimizer=sgd", "optimizer.lr=0.5", "optimizer.momentum=0", "optimizer.nesterov=false",
    ]  # fmt: skip
    runs = {}
    for micro_batch in (8, 2):
        run_dir = tmp_path / f"micro{micro_batch}"
        run(compose_train([*common, f"data.micro_batch_size={micro_batch}"], run_dir, data_dir))
        (logged,) = [m for m in read_metrics(run_dir) if "train/loss" in m]
        runs[micro_batch] = logged, load_gpt(run_dir / "checkpoints" / "last.ckpt").state_dict()
    (one, weights_one), (accum, weights_accum) = runs[8], runs[2]
    assert accum["train/loss"] == pytest.approx(one["train/loss"], rel=1e-6)
    assert accum["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    assert weights_one.keys() == weights_accum.keys()
    for name, w in weights_one.items():
        torch.testing.assert_close(weights_accum[name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_train_script_end_to_end(tmp_path, data_dir):
    """`python scripts/train.py` on a tiny budget writes the whole run folder."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "debug=smoke",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/step" in proc.stdout and str(run_dir) in proc.stdout  # the header

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("status", "step", "tokens", "train_loss", "val_loss", "hellaswag_acc_norm", "tokens_per_s", "wall_s", "seed"):
        assert key in summary
    assert summary["status"] == "completed" and summary["seed"] == 1337 and summary["step"] == 2
    assert summary["val_loss"] < summary["val_loss_initial"]

    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and "optimizer_states" in ckpt
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert any("val/loss" in m for m in read_metrics(run_dir))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))


# Resume tests: tests/test_checkpoint.py


@pytest.mark.slow
def test_trains_on_prepared_fineweb_edu(tmp_path):
    """prepare_data's shards (FineWeb-Edu schema, local parquet) feed `data=fineweb_edu` training."""
    from gptlab.config import load_data_config
    from gptlab.data.prepare import prepare_dataset
    from tests.test_prepare import fineweb_edu_rows, write_parquet

    source = write_parquet(tmp_path / "fineweb-edu" / "000_00000.parquet", fineweb_edu_rows(300))
    data = [f"data.source={source}", "data.val_fraction=0.1", f"data.dir={tmp_path / 'shards'}"]
    prepare_dataset(load_data_config(compose_train(["data=fineweb_edu", *data])))
    run_dir = tmp_path / "run"
    summary = run(compose_train(["debug=smoke", "logger=none", "data=fineweb_edu", *data], run_dir))
    assert summary["status"] == "completed" and summary["val_loss"] < summary["val_loss_initial"]


def write_hellaswag(path, n=8):
    """n examples in the HellaSwag validation schema."""
    rows = [
        {
            "ind": i,
            "activity_label": "Cooking",
            "ctx_a": "A man stands in a kitchen holding a pan.",
            "ctx_b": "he",
            "ctx": "A man stands in a kitchen holding a pan. he",
            "split": "val",
            "split_type": "indomain",
            "label": i % 4,
            "endings": ["puts it on the stove.", "eats the table.", "flies to the moon.", f"reads page {i}."],
            "source_id": f"activitynet~v_{i}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hellaswag_is_scored_during_and_after_training(tmp_path, data_dir):
    data = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    run_dir = tmp_path / "run"
    overrides = ["debug=smoke", "logger=none", f"eval.hellaswag.path={data}", "eval.hellaswag.every_n_steps=1"]
    summary = run(compose_train(overrides, run_dir, data_dir))
    assert summary["hellaswag_n"] == 8 and 0 <= summary["hellaswag_acc_norm"] <= 1
    scored = [m for m in read_metrics(run_dir) if "hellaswag/acc_norm" in m]
    assert [m["step"] for m in scored] == [1, 2]  # every step, and not twice at the last one
    assert scored[-1]["hellaswag/acc_norm"] == summary["hellaswag_acc_norm"]


def test_training_without_hellaswag_file_warns_or_fails_as_configured(tmp_path, data_dir):
    from gptlab.errors import DataError

    offline = ["debug=smoke", "logger=none", "eval.hellaswag.download=false"]
    with pytest.warns(UserWarning, match="HellaSwag: no data file"):
        summary = run(compose_train(offline, tmp_path / "warn", data_dir))
    assert summary["status"] == "completed" and summary["hellaswag_acc_norm"] is None
    with pytest.raises(DataError, match="eval.hellaswag.path"):
        run(compose_train([*offline, "eval.hellaswag.if_missing=fail"], tmp_path / "fail", data_dir))
