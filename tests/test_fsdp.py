"""distributed=fsdp on 2 CPU processes (gloo): the same training as one process with the same global batch,
sharded and full checkpoints that resume exactly, sharded checkpoints loaded by the eval scripts, HellaSwag
with as many forward passes on every rank, and the config checks.

Training runs go through scripts/train.py in subprocesses (Lightning's launcher re-runs the command line per
rank) and are shared by the tests through module-scoped fixtures: one single-process reference (in this
process), one FSDP run (the job of a multirun), and two FSDP runs resumed from its checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from gptlab.callbacks.checkpoints import checkpoint_step
from gptlab.config import ConfigError, load_config
from gptlab.errors import DataError
from gptlab.eval.hellaswag import evaluate, load_examples
from gptlab.pretrained import load_gpt, load_model
from gptlab.resume import find_resume, newest_checkpoint
from gptlab.train import run
from tests.conftest import ROOT, compose_train, read_metrics
from tests.test_hellaswag import make_records, tiny_gpt, write_jsonl

# 4 steps of 512 tokens on a small GPT. Under FSDP: 2 ranks x micro-batch 4 x 64 tokens, no accumulation;
# in one process: micro-batch 4 x 64 tokens x 2 accumulation steps. The same sequences make each step.
TINY = [
    "debug=smoke", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "max_tokens=2048", "logger=none",
    "eval.val_tokens=576",  # 9 windows: rank 0 validates 2 batches, rank 1 one batch and a padding batch
    "eval.hellaswag.limit=5", "eval.hellaswag.batch_size=2",  # rank 0 scores 2 batches, rank 1 one
    "eval.hellaswag.every_n_steps=2", "callbacks.checkpoint.every_n_steps=2", "callbacks.monitor.every_n_steps=2",
    "trainer.log_every_n_steps=1",
]  # fmt: skip
FSDP = ["distributed=fsdp", "trainer.devices=2", "trainer.accelerator=cpu"]
TIMEOUT = 300  # a rank waiting on a collective the other never calls hangs: fail instead


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric; fails on a step logged twice (e.g. by two ranks)."""
    rows = [(m["step"], m[key]) for m in read_metrics(run_dir) if key in m]
    assert len({s for s, _ in rows}) == len(rows), f"{key} logged twice for a step: {rows}"
    return dict(rows)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_gpt(path).state_dict()


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def hellaswag_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "val.jsonl", make_records(8))


@pytest.fixture(scope="module")
def train_fsdp(tmp_path_factory, data_dir, hellaswag_data):
    """Run scripts/train.py with distributed=fsdp on 2 CPU processes into a new folder; return the folder."""

    def train(name: str, *overrides: str, multirun: bool = False) -> Path:
        """multirun: as the one job of a multirun (-m) whose sweep folder is <name>."""
        run_dir = tmp_path_factory.mktemp("fsdp") / name
        where = ["-m", f"hydra.sweep.dir={run_dir}"] if multirun else [f"hydra.run.dir={run_dir}"]
        cmd = [
            sys.executable, str(ROOT / "scripts" / "train.py"), *where, *TINY, *FSDP, *overrides,
            f"eval.hellaswag.path={hellaswag_data}", f"paths.data_dir={data_dir}",
        ]  # fmt: skip
        env = {**os.environ, "WANDB_MODE": "offline"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=run_dir.parent)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return run_dir

    return train


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data_dir, hellaswag_data) -> Path:
    """The reference: one process, 2 accumulation steps, in this process."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    summary = run(compose_train([*TINY, f"eval.hellaswag.path={hellaswag_data}"], run_dir, data_dir))
    assert summary["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def fsdp_sweep(train_fsdp) -> Path:
    """FULL_SHARD, sharded checkpoints at steps 2 and 4, as the one job of a multirun: its ranks run as a torchrun
    child, since re-running the command line (Lightning's launcher) would re-run the sweep."""
    return train_fsdp("sweep", multirun=True)


@pytest.fixture(scope="module")
def fsdp_run(fsdp_sweep) -> Path:
    """The run folder of fsdp_sweep's job."""
    (summary,) = fsdp_sweep.rglob("summary.json")
    return summary.parent


@pytest.fixture(scope="module")
def resumed_full(train_fsdp, fsdp_run) -> Path:
    """Resumed from fsdp_run's sharded step-2 checkpoint by Lightning's launcher; SHARD_GRAD_OP, full (one-file)
    checkpoints every step. The path is quoted for Hydra: a multirun job's folder name holds = and ,"""
    ckpt = fsdp_run / "checkpoints" / "step_000002.ckpt"
    return train_fsdp(
        "resumed_full", f"ckpt_path='{ckpt}'", "distributed.sharding_strategy=SHARD_GRAD_OP",
        "distributed.state_dict_type=full", "callbacks.checkpoint.every_n_steps=1",
    )  # fmt: skip


@pytest.fixture(scope="module")
def resumed_sharded(train_fsdp, resumed_full) -> Path:
    """Resumed from resumed_full's one-file step-3 checkpoint; FULL_SHARD, sharded checkpoints."""
    return train_fsdp("resumed_sharded", f"ckpt_path={resumed_full / 'checkpoints' / 'step_000003.ckpt'}")


# --- FSDP equals one process ------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_loss_equals_single_process_with_accumulation(single_run, fsdp_run):
    single, fsdp = logged(single_run, "train/loss"), logged(fsdp_run, "train/loss")
    assert list(fsdp) == [1, 2, 3, 4] and fsdp[4] < fsdp[1]
    difference = max(abs(fsdp[s] - single[s]) for s in single)
    print(f"FSDP vs single process: max train loss difference {difference:.3g}")
    assert difference < 1e-5, (single, fsdp)
    # The gradients themselves are bitwise equal at step 1, the weights within 1e-6 relative; their norms
    # differ more because torch's fp32 norm of the 1.6M-element embedding on CPU is only accurate to ~1e-4
    # (FSDP combines two half-size shards' norms, which lands closer to the float64 value).
    single_norm, fsdp_norm = logged(single_run, "grad_norm"), logged(fsdp_run, "grad_norm")
    assert all(fsdp_norm[s] == pytest.approx(single_norm[s], rel=1e-3) for s in single_norm)
    assert logged(fsdp_run, "param_norm")[4] == pytest.approx(logged(single_run, "param_norm")[4], rel=1e-4)


@pytest.mark.slow
def test_parameters_equal_single_process_after_training(single_run, fsdp_run):
    """Clipping, AdamW and the LR schedule on sharded parameters make the updates of one process."""
    single = weights(single_run / "checkpoints" / "last.ckpt")
    fsdp = weights(fsdp_run / "checkpoints" / "last.ckpt")  # a sharded folder
    difference = max_difference(single, fsdp)
    print(f"FSDP vs single process: max parameter difference after 4 steps {difference:.3g}")
    assert difference < 1e-5
    assert max_difference(fsdp, weights(fsdp_run / "checkpoints" / "step_000002.ckpt")) > 1e-3  # it trained


@pytest.mark.slow
def test_validation_and_hellaswag_equal_single_process(single_run, fsdp_run):
    single_val, fsdp_val = logged(single_run, "val/loss"), logged(fsdp_run, "val/loss")
    assert list(fsdp_val) == [0, 2, 4]
    assert all(fsdp_val[s] == pytest.approx(single_val[s], abs=1e-5) for s in single_val)
    for key in ("hellaswag/acc", "hellaswag/acc_norm"):
        assert logged(fsdp_run, key) == logged(single_run, key) and list(logged(fsdp_run, key)) == [2, 4]
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["hellaswag_n"] == 5 and summary["step"] == 4


# --- sharded checkpoints ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_checkpoints_are_folders_in_one_run_folder(fsdp_run):
    folder = fsdp_run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"]
    for ckpt in folder.iterdir():  # each rank's shard, the index, and meta.pt (loops, data position, config)
        assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert newest_checkpoint(folder)[0] == folder / "last.ckpt"
    assert checkpoint_step(folder / "last.ckpt") == 4 and checkpoint_step(folder / "step_000002.ckpt") == 2


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_only_under_fsdp(fsdp_run, tmp_path):
    resume = [*TINY, f"ckpt_path='{fsdp_run}'"]  # quoted: a job folder's name has = and ,
    cfg, _ = load_config(compose_train(resume))
    with pytest.raises(ConfigError, match="ckpt_path.*sharded checkpoint.*distributed=fsdp"):
        find_resume(cfg, tmp_path)
    cfg, _ = load_config(compose_train([*FSDP, *resume]))
    assert find_resume(cfg, tmp_path).path == str(fsdp_run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_is_exact(fsdp_run, resumed_full):
    """Resumed at step 2 into a new folder (under SHARD_GRAD_OP, saving full checkpoints): steps 3 and 4
    as the uninterrupted run had them."""
    uninterrupted, resumed = logged(fsdp_run, "train/loss"), logged(resumed_full, "train/loss")
    assert list(resumed) == [3, 4]
    assert all(resumed[s] == pytest.approx(uninterrupted[s], abs=1e-6) for s in resumed)
    assert logged(resumed_full, "val/loss")[4] == pytest.approx(logged(fsdp_run, "val/loss")[4], abs=1e-6)
    folder = resumed_full / "checkpoints"
    assert all(p.is_file() for p in folder.iterdir()) and checkpoint_step(folder / "step_000003.ckpt") == 3
    assert max_difference(weights(folder / "last.ckpt"), weights(fsdp_run / "checkpoints" / "last.ckpt")) < 1e-6


@pytest.mark.slow
def test_resume_from_full_checkpoint_is_exact(fsdp_run, resumed_sharded):
    """Resumed from a one-file checkpoint of step 3, saving sharded ones again."""
    assert logged(resumed_sharded, "train/loss") == pytest.approx({4: logged(fsdp_run, "train/loss")[4]}, abs=1e-6)
    last = resumed_sharded / "checkpoints" / "last.ckpt"
    assert last.is_dir() and checkpoint_step(last) == 4
    assert max_difference(weights(last), weights(fsdp_run / "checkpoints" / "last.ckpt")) < 1e-6


@pytest.mark.slow
def test_fsdp_in_a_multirun_runs_its_ranks_without_rerunning_the_sweep(fsdp_sweep, fsdp_run):
    """One job folder, whose summary.json holds what its torchrun ranks measured."""
    assert [p.parent for p in fsdp_sweep.rglob(".hydra")] == [fsdp_run] and (fsdp_sweep / "multirun.yaml").is_file()
    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 4 and summary["hellaswag_n"] == 5
    assert summary["train_loss"] == logged(fsdp_run, "train/loss")[4]
    assert summary["val_loss"] == logged(fsdp_run, "val/loss")[4]
    assert summary["hellaswag_acc_norm"] == logged(fsdp_run, "hellaswag/acc_norm")[4]


@pytest.mark.slow
def test_load_gpt_reads_a_sharded_checkpoint_in_one_process(fsdp_run, resumed_full):
    """The eval, sample and export scripts' loader: a sharded folder gives the GPT that the full checkpoint of
    the same state holds (the resumed run's step 4 is the FSDP run's step 4, see the resume test)."""
    sharded = fsdp_run / "checkpoints" / "step_000004.ckpt"
    model = load_model(sharded)  # no process group here
    full = torch.load(resumed_full / "checkpoints" / "step_000004.ckpt", map_location="cpu", weights_only=True)
    expected = {k.removeprefix("model."): v for k, v in full["state_dict"].items()}
    assert max_difference(model.state_dict(), expected) < 1e-6
    assert model.lm_head.weight is model.transformer.wte.weight and not model.training
    x = torch.randint(0, 50257, (2, 16))
    torch.testing.assert_close(model(x)[0], load_gpt(resumed_full / "checkpoints" / "step_000004.ckpt")(x)[0])


@pytest.mark.slow
def test_load_gpt_names_a_broken_sharded_checkpoint(fsdp_run, tmp_path):
    broken = tmp_path / "last.ckpt"
    broken.mkdir()
    for name in ("meta.pt", ".metadata", "__0_0.distcp"):  # rank 1's shard is missing
        shutil.copy(fsdp_run / "checkpoints" / "last.ckpt" / name, broken)
    with pytest.raises(DataError, match="not a gptlab sharded checkpoint .*__1_0.distcp"):
        load_gpt(broken)
    (broken / ".metadata").unlink()
    with pytest.raises(DataError, match="no .metadata"):
        load_gpt(broken)
    with pytest.raises(DataError, match="no checkpoint file or sharded checkpoint folder"):
        load_gpt(tmp_path)


# --- HellaSwag: as many forward passes on every rank --------------------------------------------------------


def count_forward_passes(model: torch.nn.Module) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def fsdp_worker(rank: int, world: int, init_file: str, data: str, configs: dict, out: str) -> None:
    """Shard a GPT as training does (shard_gpt), check what each sharding strategy keeps gathered after a
    forward, then score HellaSwag with the sharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from gptlab.distributed import shard_gpt

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )  # a rank left waiting in a collective fails the test instead of hanging it
    try:
        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for strategy, config in configs.items():
            model = tiny_gpt().train()
            shard_gpt(model, mesh, load_config(config)[0])
            assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.transformer.h)
            _, loss = model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
            gathered = not isinstance(model.transformer.h[0].mlp.c_fc.weight, DTensor)  # until the backward
            loss.backward()
            calls = count_forward_passes(model)
            scores = evaluate(model, load_examples(data), batch_size=2)
            result[strategy] = {"gathered_after_forward": gathered, "forward_passes": len(calls), "scores": scores}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears the group down while the other still talks in it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_hellaswag_under_fsdp_runs_as_many_forward_passes_on_every_rank(tmp_path):
    """5 examples, 2 per batch, 2 ranks: rank 0 scores 3 examples in 2 batches, rank 1 scores 2 in 1 batch
    plus a padding batch. Without it rank 1 would stop while rank 0 waits for it to gather parameters."""
    data = write_jsonl(tmp_path / "val.jsonl", make_records(5))
    configs = {
        s: OmegaConf.to_container(compose_train([*FSDP, f"distributed.sharding_strategy={s}"]), resolve=True)
        for s in ("FULL_SHARD", "SHARD_GRAD_OP")
    }
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "init"), str(data), configs, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = evaluate(tiny_gpt(), load_examples(data), batch_size=2)
    for strategy, gathered in (("FULL_SHARD", False), ("SHARD_GRAD_OP", True)):
        ranks = [r[strategy] for r in results]
        assert [r["forward_passes"] for r in ranks] == [2, 2]
        assert [r["scores"] for r in ranks] == [single, single]
        assert [r["gathered_after_forward"] for r in ranks] == [gathered, gathered]  # ZeRO-3 vs ZeRO-2


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["distributed.sharding_strategy=HYBRID"], "distributed.sharding_strategy"),
        (["precision=fp16"], "precision"),
        (["distributed.state_dict_type=local"], "distributed.state_dict_type"),
        (["distributed.reduce_dtype=float16"], "distributed.reduce_dtype"),
        (["distributed.process_group_backend=mpi"], "distributed.process_group_backend"),
    ],
)
def test_invalid_fsdp_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        load_config(compose_train([*FSDP, *overrides]))
    assert error.value.key == key


def test_strategy_follows_the_config():
    from gptlab.distributed import AtomicModelParallelStrategy, _mixed_precision, build_strategy

    cfg, _ = load_config(compose_train([*FSDP, "distributed.sharding_strategy=SHARD_GRAD_OP"]))
    strategy = build_strategy(cfg)
    assert isinstance(strategy, AtomicModelParallelStrategy) and strategy._save_distributed_checkpoint
    assert strategy._data_parallel_size == 2 and strategy._tensor_parallel_size == 1
    cfg, _ = load_config(compose_train([*FSDP, "distributed.state_dict_type=full", "precision=bf16"]))
    assert not build_strategy(cfg)._save_distributed_checkpoint
    policy = _mixed_precision(cfg)  # bf16 compute, fp32 gradient reduction by default
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    cfg, _ = load_config(compose_train([*FSDP, "precision=bf16", "distributed.reduce_dtype=bfloat16"]))
    assert _mixed_precision(cfg).reduce_dtype == torch.bfloat16
    assert _mixed_precision(load_config(compose_train(FSDP))[0]).param_dtype is None  # fp32: as stored
