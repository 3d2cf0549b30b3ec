"""What a new user meets: the result block a run ends with, the progress bar in optimizer steps, a quiet console,
resuming in place with only the folder, the newest sweep summarized by default."""

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from gptlab.callbacks.progress import StepProgressBar
from gptlab.console import CHATTER, quiet_console
from gptlab.report import result_block
from tests.conftest import ROOT, read_metrics
from tests.test_summarize import load_script

SUMMARY = {
    "status": "completed", "step": 48, "tokens": 196608, "train_loss": 6.1263, "val_loss": 6.5491,
    "val_loss_initial": 10.7762, "val_bpb": 2.7163, "val_bpb_initial": 4.4683, "hellaswag_acc_norm": 0.255,
    "hellaswag_n": 200, "tokens_per_s": 823.4, "mfu": None, "wall_s": 324.2, "sample": "The\n\nobject",
}  # fmt: skip


def test_the_result_block_has_the_results_where_they_are_and_what_to_run_next(tmp_path):
    (tmp_path / "wandb" / "offline-run-20261203_195644-a9myd5uu").mkdir(parents=True)
    block = result_block(SUMMARY, tmp_path)
    assert block.splitlines()[0] == "gptlab: done"
    assert "val loss 10.776 -> 6.549, bpb 4.468 -> 2.716, train loss 6.126" in block
    assert "HellaSwag acc_norm 0.2550 on 200 examples" in block
    assert "823 tokens/s; 48 steps, 196,608 tokens in 5m 24s" in block
    assert '"The⏎⏎object" (greedy' in block  # one line, whatever the model wrote
    assert f"{tmp_path / 'summary.json'}, {tmp_path / 'checkpoints' / 'last.ckpt'}" in block
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-*'}" in block
    for command in (f"scripts/sample.py checkpoint={tmp_path}/checkpoints/last.ckpt",
                    f"scripts/train.py hydra.run.dir={tmp_path} ckpt_path={tmp_path} max_tokens=393216",
                    f"scripts/rerun.py {tmp_path} seed=1"):  # fmt: skip
        assert command in block


def test_the_result_block_says_what_was_not_measured(tmp_path):
    block = result_block({**SUMMARY, "val_loss_initial": None, "val_bpb": None, "hellaswag_acc_norm": None,
                          "sample": None, "tokens_per_s": None}, tmp_path)  # fmt: skip
    assert "val loss 6.549, train loss" in block and "acc_norm" not in block and "greedy" not in block
    assert "no steps timed" in block and "W&B" not in block  # no offline run in the folder


def test_the_progress_bar_counts_optimizer_steps_from_a_resumed_step(capsys):
    """6 steps of 2 micro-batches, resumed at step 2: the bar goes 2 -> 6 of 6, one tick per optimizer step."""
    bar = StepProgressBar(total_steps=6, refresh_rate=1)
    module = SimpleNamespace(step_stats={}, val_metrics={})
    trainer = SimpleNamespace(global_step=2, is_global_zero=True, callbacks=[], sanity_checking=False)
    bar.on_train_start(trainer, module)
    seen = [bar.bar.n]
    for step in range(3, 7):
        for micro in range(2):
            trainer.global_step = step if micro == 1 else step - 1
            module.step_stats = {"loss": 10.0 - step}
            bar.on_train_batch_end(trainer, module, None, None, None)
        seen.append(bar.bar.n)
    assert seen == [2, 3, 4, 5, 6] and bar.bar.total == 6
    bar.on_validation_start(trainer, module)
    assert bar.bar.postfix.endswith("validating")
    module.val_metrics = {"val/loss": 4.25}
    bar.on_validation_end(trainer, module)
    assert bar.bar.postfix == "loss 4.000, val 4.250"
    bar.on_train_end(trainer, module)
    err = capsys.readouterr().err
    assert "6/6" in err and "step" in err and "v_num" not in err and "Epoch" not in err


def test_lightnings_chatter_stays_off_the_console_and_in_the_log():
    import lightning  # noqa: F401  (its console handler)

    quiet_console()
    (console,) = [h for h in logging.getLogger("lightning").handlers if isinstance(h, logging.StreamHandler)]
    for line in ("GPU available: False, used: False", "💡 Tip: For seamless cloud logging ...",
                 "`weights_only` was not set, defaulting to `False`.", "`Trainer.fit` stopped: `max_steps=4` reached."):
        record = logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, line, None, None)
        assert line.startswith(CHATTER) and not console.filter(record)  # fmt: skip
    kept = logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, "SIGTERM: stopped after step 8", None, None)
    assert console.filter(kept)
    assert warnings.formatwarning("no data file", UserWarning, "/x/hellaswag.py", 54) == "UserWarning: no data file"


def test_summarize_sweep_with_no_folder_takes_the_newest(tmp_path, monkeypatch):
    script = load_script("summarize_sweep")
    for age, name in enumerate(["2026-12-03_10-00-00_aaaaaa", "my_sweep", "2026-12-02_10-00-00_bbbbbb"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (time.time() - 100 * age, time.time() - 100 * age))
    assert script.newest_sweep(tmp_path) == tmp_path / "2026-12-03_10-00-00_aaaaaa"
    with pytest.raises(script.UserInputError, match="no sweep in"):
        script.newest_sweep(tmp_path / "none")


@pytest.mark.slow
def test_a_run_resumed_with_only_its_folder_continues_and_rerun_starts_it_afresh(tmp_path, data_dir):
    """Made with overrides, resumed in place with only the folder and a longer budget: it continues (the run's
    own overrides composed again), the console shows the header, the bar and the result block and none of the
    libraries' chatter, and rerun.py of the folder trains the whole longer run from step 0."""
    env = {**os.environ, "GPTLAB_DATA_DIR": str(data_dir), "WANDB_MODE": "offline"}
    run_dir = tmp_path / "run"
    made = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "eval.hellaswag.enabled=false",
            "data.seq_len=64", "data.micro_batch_size=4", "global_batch_tokens=512", "eval.val_tokens=256"]  # fmt: skip

    def train(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={run_dir}", *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = train(*made, "max_tokens=1024")
    second = train(f"ckpt_path={run_dir}", "max_tokens=2048")  # nothing else
    assert "resume     from" in second.stdout and "(step 2)" in second.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["params"] < 2_000_000
    for done in (first, second):
        assert "gptlab: done" in done.stdout and "result  val loss" in done.stdout
        for noise in ("wandb:", "GPU available", "Tip:", "v_num", "Epoch 0", "weights_only"):
            assert noise not in done.stdout + done.stderr, noise
    assert "train: 100%" in second.stderr and "4/4" in second.stderr
    log = (run_dir / "train.log").read_text()
    assert "gptlab: done" in log and "GPU available" in log  # the console's lines, and the chatter kept off it
    recorded = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "ckpt_path" not in recorded and "max_tokens=2048" in recorded and "model.n_layer=2" in recorded

    cmd = [sys.executable, str(ROOT / "scripts" / "rerun.py"), str(run_dir), f"hydra.run.dir={tmp_path / 'rerun'}"]
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((tmp_path / "rerun" / "summary.json").read_text())["step"] == 4
    assert [m["step"] for m in read_metrics(tmp_path / "rerun") if "train/loss" in m] == [1, 2, 3, 4]  # from step 0


def test_readme_says_what_a_run_writes_and_how_it_ends():
    text = (ROOT / "README.md").read_text()
    assert "result block" in text and "word salad" in text and "12 bytes per parameter" in text
    assert Path(ROOT / "docs" / "configuration.md").read_text().count("Resuming in place needs only the folder") == 1
