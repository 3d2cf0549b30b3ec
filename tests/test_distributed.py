"""DDP trains exactly like one process with the same global batch: the data each optimizer step reads, the
losses, the final weights, validation and HellaSwag; one gradient all-reduce per optimizer step; one run folder
per job under Lightning's launcher and under torchrun.

The 2-process jobs run as subprocesses (Lightning's DDP launcher re-runs the command line): three runs in all
(~1.5-2 min on 2 CPU cores, the `slow` tests), shared by the tests through a module fixture:
- single:    one process, micro-batch 8 x 2 accumulation steps (in this process);
- lightning: `python tests/ddp_sync_probe.py distributed=ddp trainer.devices=2`, micro-batch 4 x 2 accumulation
             steps; the probe is scripts/train.py plus a record of DDP's all-reduces; W&B offline;
- torchrun:  `torchrun --nproc_per_node=2 scripts/train.py distributed=ddp trainer.devices=2`, micro-batch 8,
             no accumulation; the ranks name their run folder themselves.
"""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from gptlab.config import load_config
from gptlab.data.datamodule import TokenDataModule
from gptlab.train import run
from tests.conftest import ROOT, compose_train
from tests.test_hellaswag import make_records, write_jsonl

SEQ_LEN = 256  # the sample config's; a global batch of 4096 tokens is 16 sequences
RUN_TIMEOUT_S = 420

# --- the data: every optimizer step reads the same sequences, however they are dealt out -----------------------

# (devices, micro-batch, accumulation steps): 16 sequences per optimizer step each.
LAYOUTS = [(1, 8, 2), (2, 8, 1), (2, 4, 2), (1, 4, 4), (2, 2, 4)]


def loaders(data_dir, devices: int, micro_batch: int, shuffle: bool, max_tokens: int, global_step: int = 0):
    """Each rank's training loader as TokenDataModule builds it, for a trainer at `global_step`."""
    overrides = [
        f"trainer.devices={devices}", f"data.micro_batch_size={micro_batch}", f"data.shuffle={shuffle}",
        f"max_tokens={max_tokens}", "scheduler.warmup_steps=1", *(["distributed=ddp"] if devices > 1 else []),
    ]  # fmt: skip
    cfg, plan = load_config(compose_train(overrides, data_dir=data_dir))
    modules = []
    for rank in range(devices):
        dm = TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed)
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=devices, global_step=global_step, strategy=strategy)
        dm.setup("fit")
        modules.append(dm)
    return plan, modules


def step_sequences(plan, modules, steps) -> dict[int, list]:
    """Optimizer step -> the sorted input sequences that all ranks' micro-batches of that step hold."""
    out = {}
    for step in steps:
        rows = []
        for dm in modules:
            loader = dm.train_dataloader()
            for micro in range(plan.grad_accum):
                x, _ = loader.dataset[step * plan.grad_accum + micro]
                rows += map(tuple, x.tolist())
        out[step] = sorted(rows)
    return out


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "sequential"])
def test_every_step_reads_the_same_sequences_on_any_devices_and_micro_batch(data_dir, shuffle):
    """The ranks' micro-batches of optimizer step s hold, together, exactly the sequences of step s of one
    process, also across the end of an epoch (the sample's ~2000 sequences of 256 tokens are not a whole number
    of global batches), so changing devices or micro-batch changes the accumulation, not the data of any update."""
    reference = None
    for devices, micro_batch, accum in LAYOUTS:
        plan, modules = loaders(data_dir, devices, micro_batch, shuffle, max_tokens=16 * SEQ_LEN)
        assert (plan.world_size, plan.grad_accum) == (devices, accum)
        if reference is None:
            epoch = len(modules[0].train_dataloader().dataset) // accum  # optimizer steps
            steps = [0, 1, epoch - 1, epoch, epoch + 1]  # the last step of an epoch, the first of the next
        got = step_sequences(plan, modules, steps)
        assert all(len(rows) == 16 and len(set(rows)) == 16 for rows in got.values())  # no sequence twice
        reference = reference or got
        for step in steps:
            assert got[step] == reference[step], f"{devices} device(s) x micro-batch {micro_batch}: step {step}"


def test_each_rank_resumes_at_its_own_position(data_dir):
    """A rank resumed at step s continues with exactly the micro-batches it would have read."""
    max_tokens = 6 * 16 * SEQ_LEN
    plan, fresh = loaders(data_dir, 2, 4, True, max_tokens)
    _, at_step_4 = loaders(data_dir, 2, 4, True, max_tokens, global_step=4)
    _, resumed = loaders(data_dir, 2, 4, True, max_tokens, global_step=4)
    tails = []
    for rank in (0, 1):
        resumed[rank].load_state_dict(at_step_4[rank].state_dict())
        resumed[rank].trainer.global_step = 4  # Lightning restores the step before it asks for the loader
        full, tail = list(fresh[rank].train_dataloader()), list(resumed[rank].train_dataloader())
        assert len(full) == 6 * plan.grad_accum and len(tail) == 2 * plan.grad_accum
        for (x, y), (rx, ry) in zip(full[4 * plan.grad_accum :], tail):
            assert torch.equal(x, rx) and torch.equal(y, ry)
        tails.append(torch.cat([x for x, _ in tail]))
    assert not set(map(tuple, tails[0].tolist())) & set(map(tuple, tails[1].tolist()))  # each its own slice


# --- three real runs: one process, DDP by Lightning's launcher, DDP by torchrun --------------------------------

COMMON = [
    "trainer.accelerator=cpu", "max_tokens=16384", "global_batch_tokens=4096", "scheduler.warmup_steps=1",
    "eval.every_n_steps=2", "eval.val_tokens=2560", "eval.hellaswag.limit=11",  # 5 and 6 examples per rank
    "callbacks.progress_bar_refresh_rate=0",
]  # fmt: skip


def start(cmd: list[str], cwd) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, name: str) -> str:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"{name} run took over {RUN_TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{name} run failed:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """{name: (run folder, console output)}; the two DDP jobs run side by side while the single one trains here."""
    tmp = tmp_path_factory.mktemp("distributed")
    hellaswag = write_jsonl(tmp / "hellaswag_val.jsonl", make_records())
    common = [*COMMON, f"paths.data_dir={data_dir}", f"eval.hellaswag.path={hellaswag}"]
    ddp = ["distributed=ddp", "trainer.devices=2"]
    lightning_root, torchrun_root = tmp / "lightning", tmp / "torchrun"  # each job's working directory
    lightning_root.mkdir()
    torchrun_root.mkdir()
    lightning = start(
        [
            sys.executable, str(ROOT / "tests" / "ddp_sync_probe.py"), *common, *ddp, "data.micro_batch_size=4",
            "distributed.bucket_cap_mb=1", "logger=wandb", "logger.mode=offline",
            f"hydra.run.dir={lightning_root / 'run'}", f"paths.output_root={lightning_root / 'outputs'}",
        ],
        cwd=lightning_root,
    )  # fmt: skip
    torchrun = start(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",  # = torchrun, as in the README
            str(ROOT / "scripts" / "train.py"), *common, *ddp, "logger=none",
            f"paths.output_root={torchrun_root / 'outputs'}",  # no hydra.run.dir: the ranks agree on a name
        ],
        cwd=torchrun_root,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP rank on 2 cores; the CPU is shared with the two jobs
    try:
        assert run(compose_train([*common, "logger=none"], tmp / "single", data_dir))["status"] == "completed"
        lightning_out, torchrun_out = finish(lightning, "lightning"), finish(torchrun, "torchrun")
    finally:
        torch.set_num_threads(threads)
        for proc in (lightning, torchrun):
            if proc.poll() is None:  # the single run failed: stop the jobs (each in its own session)
                os.killpg(proc.pid, signal.SIGKILL)
    outputs = {"single": (tmp / "single", ""), "lightning": (lightning_root / "run", lightning_out)}
    folders = [p for p in (torchrun_root / "outputs" / "runs").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1, f"torchrun's ranks made {len(folders)} run folders: {folders}"
    outputs["torchrun"] = folders[0], torchrun_out
    return outputs


def metrics(run_dir, key: str) -> dict[int, float]:
    """step -> value of `key` in the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("ddp_run", ["lightning", "torchrun"])
def test_ddp_logs_the_single_process_losses(runs, ddp_run):
    """train/loss (mean over micro-steps and ranks), the gradient norm and val/loss, step by step."""
    single, ddp = runs["single"][0], runs[ddp_run][0]
    for key, rel in (("train/loss", 1e-5), ("grad_norm", 1e-4), ("val/loss", 1e-5)):
        want, got = metrics(single, key), metrics(ddp, key)
        assert sorted(got) == sorted(want) and len(want) >= 3, key
        diff = max(abs(got[s] - want[s]) for s in want)
        print(f"{ddp_run}: max |{key} - single| = {diff:.3g}")
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=rel), f"{key} at step {step}"
    assert sorted(metrics(single, "train/loss")) == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("ddp_run", ["lightning", "torchrun"])
def test_ddp_ends_with_the_single_process_weights(runs, ddp_run):
    """After 4 AdamW steps (lr 3e-3). Adam divides by the gradient's magnitude, so the last-bit differences of
    another micro-batch size can move a weight whose gradient is near 0 by ~1e-5 (measured: one element in
    millions); a rank reading wrong data would move weights by ~lr. Hence a loose maximum, a tight mean."""
    want, got = (last_weights(runs[name][0]) for name in ("single", ddp_run))
    assert got.keys() == want.keys()
    diffs = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    print(f"{ddp_run}: |weight - single|: max {diffs.max():.3g}, mean {diffs.mean():.3g}")
    assert diffs.mean() < 1e-7
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def last_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("ddp_run", ["lightning", "torchrun"])
def test_ddp_summary_has_the_single_process_evaluation(runs, ddp_run):
    """Validation windows and HellaSwag examples are split across the ranks and the sums reduced."""
    want, got = summary(runs["single"][0]), summary(runs[ddp_run][0])
    assert got["status"] == "completed" and got["step"] == 4 and got["tokens"] == 16384
    for key in ("train_loss", "val_loss", "val_loss_initial"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert want["hellaswag_n"] == got["hellaswag_n"] == 11
    assert (got["hellaswag_acc"], got["hellaswag_acc_norm"]) == (want["hellaswag_acc"], want["hellaswag_acc_norm"])


@pytest.mark.slow
def test_lightning_launcher_job_has_one_run_folder_and_one_wandb_run(runs):
    run_dir, out = runs["lightning"]
    root = run_dir.parent  # the job's working directory; its paths.output_root would be root/outputs
    assert [p.name for p in root.iterdir()] == ["run"]  # no other folder, e.g. one of rank 1's own
    assert summary(run_dir)["status"] == "completed"
    assert [p.parent for p in root.rglob(".hydra")] == [run_dir]
    assert [p.parent for p in root.rglob("summary.json")] == [run_dir]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 logs here
    assert [p.parent.parent for p in root.rglob("offline-run-*")] == [run_dir]  # one W&B run, rank 0's
    # The header, printed once (rank 0): the same global batch, split differently.
    assert out.count("tokens/step") == 1
    assert "4,096 tokens/step = micro-batch 4 x seq 256 x 2 device(s) x 2 accumulation step(s)" in out


@pytest.mark.slow
def test_torchrun_ranks_share_the_folder_rank_0_names(runs):
    run_dir, out = runs["torchrun"]  # the fixture checked it is the only run folder under <output_root>/runs
    root = run_dir.parents[2]  # the job's working directory, holding <output_root> = root/outputs
    assert [p.name for p in root.iterdir()] == ["outputs"]
    assert [p.name for p in (root / "outputs").iterdir()] == ["runs"]
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["run_dir"] == str(run_dir)
    assert [p.parent for p in root.rglob(".hydra")] == [run_dir]  # only rank 0 writes .hydra/
    assert [p.parent for p in root.rglob("summary.json")] == [run_dir]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file()
    assert (run_dir / "metrics.jsonl").is_file()  # written by rank 0 into the same folder
    assert out.count("tokens/step") == 1
    assert "4,096 tokens/step = micro-batch 8 x seq 256 x 2 device(s) x 1 accumulation step(s)" in out


@pytest.mark.slow
def test_gradients_are_all_reduced_once_per_optimizer_step(runs):
    """With 2 accumulation steps, DDP's all-reduce runs in the last micro-step's backward only (Lightning runs the
    others under no_sync): per optimizer step, every bucket once, and all gradient elements exactly once."""
    run_dir = runs["lightning"][0]
    records = [json.loads((run_dir / f"sync_rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0] == records[1]  # the ranks take part in the same collectives
    steps = records[0]["steps"]
    assert len(steps) == 4
    for step in steps:
        buckets = step["buckets"]
        assert step["micro_batches"] == 2
        assert [b[0] for b in buckets] == list(range(len(buckets)))
        assert [b[1] for b in buckets] == [False] * (len(buckets) - 1) + [True]  # is_last: one, the last
        assert sum(b[2] for b in buckets) == records[0]["num_params"]
    assert max(len(s["buckets"]) for s in steps) > 1  # distributed.bucket_cap_mb=1 reached DDP
