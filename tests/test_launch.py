"""Launch paths: who started the process (torchrun, srun, none), the run folder every rank of a launch
shares, the checks of what a launcher started, and DDP jobs inside a Hydra multirun (Lightning #11300).

The launcher environments are faked with environment variables; the multirun is a real 2-job CPU sweep."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from gptlab import launch
from gptlab.errors import ConfigError
from gptlab.sweep import job_statuses
from tests.conftest import CONF, ROOT
from tests.test_sweep import wandb_records

LAUNCHER_VARS = (
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK",
    "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_RESTART_COUNT",
)  # fmt: skip
RUN_NAME = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}")


def torchrun_env(rank: int = 0, world: int = 2, per_node: int = 2, run_id: str = "3c6af90e", restarts: int = 0):
    """What `torchrun --nproc_per_node=<per_node> --nnodes=<world/per_node>` gives one of its processes."""
    return {
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": str(restarts), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(per_node), "RANK": str(rank), "LOCAL_RANK": str(rank % per_node),
    }  # fmt: skip


def srun_env(rank: int = 0, tasks: int = 2, nodes: int = 1, job: str = "4242", step: str = "0"):
    """What `srun --ntasks=<tasks> --nodes=<nodes>` gives one of its tasks."""
    return {
        "SLURM_NTASKS": str(tasks), "SLURM_NNODES": str(nodes), "SLURM_PROCID": str(rank),
        "SLURM_JOB_ID": job, "SLURM_STEP_ID": step,
    }  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    """Set a launcher environment: no launcher variable of the test process leaks in, and global_rank reads
    the environment (not Lightning's rank, which another test module may have imported)."""
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(sys.modules, "lightning.fabric.utilities.rank_zero", raising=False)

    def set_env(variables: dict[str, str]) -> None:
        for var in LAUNCHER_VARS:
            monkeypatch.delenv(var, raising=False)
        for var, value in variables.items():
            monkeypatch.setenv(var, value)

    return set_env


# --- who started this process ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variables, launcher",
    [
        ({}, None),
        (torchrun_env(), "torchrun"),
        (torchrun_env(world=1, per_node=1), None),  # torchrun with one process: nothing to share
        (srun_env(), "srun"),
        (srun_env(tasks=1), None),
        ({k: v for k, v in srun_env().items() if k != "SLURM_STEP_ID"}, None),  # an sbatch/salloc shell, no srun
        ({**srun_env(tasks=2), **torchrun_env()}, "torchrun"),  # torchrun started by srun, one task per node
    ],
)
def test_external_launcher(env, variables, launcher):
    env(variables)
    assert launch.external_launcher() == launcher


def test_global_rank_from_each_launcher(env, monkeypatch):
    env({})
    assert launch.global_rank() == 0
    env(torchrun_env(rank=3, world=4))
    assert launch.global_rank() == 3
    env(srun_env(rank=5, tasks=8))
    assert launch.global_rank() == 5
    env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"})  # a batch script, not one of srun's ranks
    assert launch.global_rank() == 0
    env({"LOCAL_RANK": "1", "WORLD_SIZE": "2"})  # a rank Lightning's own DDP launcher started
    assert launch.global_rank() == 1
    # Once Lightning is imported, its rank wins: it also knows the ranks it spawned itself (no environment).
    lightning_rank = SimpleNamespace(rank_zero_only=SimpleNamespace(rank=1))
    monkeypatch.setitem(sys.modules, "lightning.fabric.utilities.rank_zero", lightning_rank)
    env({})
    assert launch.global_rank() == 1


def test_launcher_world(env):
    env(torchrun_env(world=8, per_node=4))
    assert launch.launcher_world() == (4, 2)
    env(srun_env(tasks=8, nodes=2))
    assert launch.launcher_world() == (4, 2)


# --- one run folder per launch ----------------------------------------------------------------------------


def test_single_process_draws_a_fresh_name(env, tmp_path):
    env({})
    names = {launch.run_name(str(tmp_path)) for _ in range(3)}
    assert len(names) == 3 and all(RUN_NAME.fullmatch(n) for n in names)
    assert not (tmp_path / "runs").exists()  # naming writes nothing


def test_ranks_of_one_launch_name_the_same_folder_alone(env, tmp_path):
    """Every rank computes the name from the launcher's ids: no files, no waiting for rank 0."""
    for variables, name in ((torchrun_env, "torchrun-3c6af90e-0"), (srun_env, "slurm-4242.0-0")):
        names = set()
        for rank in (1, 0):  # in any order
            env(variables(rank=rank))
            names.add(launch.run_name(str(tmp_path)))
        assert names == {name}
    assert not (tmp_path / "runs").exists()


def test_a_launch_reusing_an_id_is_refused_by_rank_0(env, tmp_path):
    """An earlier launch with the same torchrun --rdzv-id left its run folder: rank 0 refuses to write into it
    (the other ranks cannot tell it from the folder their own rank 0 is making; torchrun stops them)."""
    (tmp_path / "runs" / "torchrun-3c6af90e-0" / ".hydra").mkdir(parents=True)
    env(torchrun_env(rank=1))
    assert launch.run_name(str(tmp_path)) == "torchrun-3c6af90e-0"
    env(torchrun_env(rank=0))
    with pytest.raises(ConfigError, match="holds an earlier launch with the same id") as error:
        launch.run_name(str(tmp_path))
    assert error.value.key == "hydra.run.dir"
    env(torchrun_env(rank=0, restarts=1))  # torchrun restarted the workers: a new folder
    assert launch.run_name(str(tmp_path)) == "torchrun-3c6af90e-1"


def test_launch_ids_differ_per_launch(env):
    ids = []
    for variables in [
        torchrun_env(run_id="aaaa"),
        torchrun_env(run_id="bbbb"),
        torchrun_env(run_id="aaaa", restarts=1),  # torchrun restarted the failed workers: a new folder
        srun_env(job="1", step="0"),
        srun_env(job="1", step="1"),
        srun_env(job="2", step="0"),
        {**srun_env(job="1", step="0"), "SLURM_RESTART_COUNT": "1"},  # the job requeued after preemption
    ]:
        env(variables)
        ids.append(launch.launch_id())
        env({**variables, "RANK": "1", "SLURM_PROCID": "1"})
        assert launch.launch_id() == ids[-1]  # the same for every rank
    assert len(set(ids)) == len(ids)
    env({})
    assert launch.launch_id() is None


def test_torchrun_without_a_run_id_is_refused(env, tmp_path):
    env(torchrun_env(run_id="none"))  # a static rendezvous with no --rdzv-id: every launch would share it
    with pytest.raises(ConfigError, match="--rdzv-id") as error:
        launch.run_name(str(tmp_path))
    assert error.value.key == "hydra.run.dir"


# --- what Hydra makes of conf/hydra/default.yaml on each rank ----------------------------------------------


def hydra_node(output_root: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(config_name="train", overrides=[f"paths.output_root={output_root}"], return_hydra_config=True)
    return cfg.hydra


def test_hydra_config_on_rank_0_and_rank_1(env, tmp_path):
    env(torchrun_env(rank=0))
    rank0 = hydra_node(tmp_path)
    run_dir = Path(rank0.run.dir)
    assert run_dir == tmp_path / "runs" / "torchrun-3c6af90e-0"
    assert rank0.job.name == "train"
    env(torchrun_env(rank=1))
    rank1 = hydra_node(tmp_path)
    assert rank1.run.dir == str(run_dir)  # rank 0's folder
    assert rank1.job.name == "train_rank1"  # its own log (only rank 0 writes .hydra/: gptlab.run_folder)
    env(srun_env(rank=1))
    assert hydra_node(tmp_path).job.name == "train_rank1"


# --- checks of what the launcher started -------------------------------------------------------------------


def cfg(devices: int, nodes: int = 1):
    return SimpleNamespace(trainer=SimpleNamespace(devices=devices), distributed=SimpleNamespace(num_nodes=nodes))


def test_check_launch_devices_must_match_the_launcher(env):
    env({})
    launch.check_launch(cfg(devices=4), multirun=False, hydra_launcher="basic")  # Lightning starts the ranks
    env(torchrun_env(world=2, per_node=2))
    launch.check_launch(cfg(devices=2), multirun=False, hydra_launcher="basic")
    with pytest.raises(ConfigError, match=r"set trainer.devices=2 distributed.num_nodes=1 \(got 1 and 1\)") as e:
        launch.check_launch(cfg(devices=1), multirun=False, hydra_launcher="basic")
    assert e.value.key == "trainer.devices"
    env(srun_env(tasks=8, nodes=2))
    launch.check_launch(cfg(devices=4, nodes=2), multirun=False, hydra_launcher="basic")
    with pytest.raises(ConfigError, match=r"srun started 4 process\(es\) per node on 2 node\(s\): set trainer.devi"
                       r"ces=4 distributed.num_nodes=2 \(got 8 and 1\)"):  # fmt: skip
        launch.check_launch(cfg(devices=8), multirun=False, hydra_launcher="basic")


def test_check_launch_refuses_a_sweep_in_every_rank(env):
    env(torchrun_env())
    for hydra_launcher in ("basic", "joblib"):
        with pytest.raises(ConfigError, match="runs the whole sweep in every rank") as e:
            launch.check_launch(cfg(devices=2), multirun=True, hydra_launcher=hydra_launcher)
        assert e.value.key == "hydra/launcher"
    env(srun_env())  # a job of a submitit sweep: srun started its ranks, the sweep ran on the login node
    launch.check_launch(cfg(devices=2), multirun=True, hydra_launcher="slurm")


def test_a_multirun_job_on_several_nodes_needs_slurm(env):
    env({})
    launch.check_launch(cfg(devices=2), multirun=True, hydra_launcher="basic")  # its ranks run as torchrun children
    with pytest.raises(ConfigError, match="use hydra/launcher=slurm") as e:
        launch.check_launch(cfg(devices=2, nodes=2), multirun=True, hydra_launcher="basic")
    assert e.value.key == "distributed.num_nodes"


# --- DDP inside a multirun ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory, data_dir) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`-m distributed=ddp trainer.devices=2 optimizer.lr=1e9,3e-3`: a job that diverges in its torchrun ranks,
    then one that trains (2 steps of 2 micro-steps per rank; no periodic validation at the last step).
    Returns the process, the tmp root and the sweep folder."""
    root = tmp_path_factory.mktemp("ddp_sweep")
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "debug=smoke",  # micro-batch 4 x 64 tokens
        "distributed=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "optimizer.lr=1e9,3e-3",
        "global_batch_tokens=1024", "max_tokens=2048", "eval.every_n_steps=3", "eval.hellaswag.enabled=false",
        "logger=wandb", f"paths.output_root={root}", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={root / 'sweep'}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    return proc, root, root / "sweep"


def job_folder(sweep_dir: Path, lr: str) -> Path:
    (folder,) = [p.parent for p in sweep_dir.rglob(".hydra") if f"optimizer.lr={lr}," in str(p)]
    return folder


@pytest.mark.slow
def test_ddp_sweep_runs_each_job_once_and_goes_on_after_a_diverged_job(ddp_sweep):
    proc, root, sweep_dir = ddp_sweep
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]  # exit status: the number of failed jobs
    assert output.count("Launching 2 jobs locally") == 1  # no rank re-ran the sweep (Lightning #11300)
    diverged, trained = job_folder(sweep_dir, "1000000000.0"), job_folder(sweep_dir, "0.003")
    relative = str(diverged.relative_to(sweep_dir))
    assert re.search(rf"sweep: 1 of 2 jobs failed: {re.escape(relative)} \(diverged\)", proc.stderr)
    assert job_statuses(sweep_dir) == {relative: "diverged", str(trained.relative_to(sweep_dir)): "completed"}
    assert [p.name for p in root.iterdir()] == ["sweep"]  # no runs/, multiruns/, lightning_logs/ or wandb/ besides
    assert len(list(sweep_dir.rglob(".hydra"))) == 2
    summary = json.loads((diverged / "summary.json").read_text())
    assert summary["error"].startswith("Training stopped: non-finite loss at step 2")  # one line, no traceback


@pytest.mark.slow
def test_ddp_sweep_job_results_come_back_from_its_torchrun_ranks(ddp_sweep):
    _, _, sweep_dir = ddp_sweep
    folder = job_folder(sweep_dir, "0.003")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2 and summary["tokens"] == 2048
    for key in ("train_loss", "val_loss", "val_loss_initial", "tokens_per_s"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    val = [(m["step"], m["val/loss"]) for m in metrics if "val/loss" in m]
    assert [step for step, _ in val] == [0, 2]  # validated at the last step, inside fit
    assert [loss for _, loss in val] == pytest.approx([summary["val_loss_initial"], summary["val_loss"]])
    assert [m["train/loss"] for m in metrics if "train/loss" in m][-1] == pytest.approx(summary["train_loss"])


@pytest.mark.slow
def test_ddp_sweep_one_finished_wandb_run_per_job(ddp_sweep):
    _, _, sweep_dir = ddp_sweep
    for lr, exit_code, last_step in (("1000000000.0", 1, 1), ("0.003", 0, 2)):
        folder = job_folder(sweep_dir, lr)
        records = wandb_records(folder)  # exactly one offline run in the job's folder
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert max(h["trainer/global_step"] for h in history if "train/loss" in h) == last_step  # logged by rank 0
        assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [exit_code]
