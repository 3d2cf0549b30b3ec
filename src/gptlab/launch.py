"""Who started this process, which run folder it writes into, and starting a job's ranks.

A training job runs as one process, or as one process per device started by one of:
- Lightning itself (`trainer.devices=N`): it re-runs the command line for ranks 1..N-1 and hands them the
  run folder (`hydra.run.dir`);
- torchrun (`torchrun --nproc_per_node=N scripts/train.py ...`) or SLURM's srun: every rank runs Hydra on its
  own and names the run folder alike from the launcher's ids (`run_name`); only rank 0 writes .hydra/;
- inside a Hydra multirun, the job itself: it runs its ranks as a torchrun child on the job's folder and
  overrides (`run_ranks`), since Lightning's launcher would re-run the whole sweep (Lightning #11300).
This module imports no torch or Lightning: Hydra's resolvers and the config checks use it before they load.
"""

import os
import secrets
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.errors import ConfigError


def external_launcher() -> str | None:
    """"torchrun" or "srun" when that launcher started this process as one of several ranks, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return "torchrun"
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_STEP_ID" in os.environ:
        return "srun"
    return None


def launcher_world() -> tuple[int, int]:
    """(processes per node, nodes) that the external launcher started."""
    if external_launcher() == "torchrun":
        per_node = int(os.environ["LOCAL_WORLD_SIZE"])
        return per_node, int(os.environ["WORLD_SIZE"]) // per_node
    nodes = int(os.environ.get("SLURM_NNODES", 1))
    return int(os.environ["SLURM_NTASKS"]) // nodes, nodes


def global_rank() -> int:
    """This process's rank: Lightning's once it has set up the processes, else the launcher's environment's."""
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:  # Lightning read the environment when imported and knows spawned ranks too
        return int(rank_zero.rank_zero_only.rank)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ and (var != "SLURM_PROCID" or external_launcher() == "srun"):
            return int(os.environ[var])
    return 0


def run_name(output_root: str) -> str:
    """The run folder's name: `<date>_<time>_<random>` for a single process; under torchrun or srun the launch's
    id (`torchrun-<run id>-<restart>`, `slurm-<job>.<step>-<requeue>`), which every rank computes alike.
    A launch that reuses an id (torchrun --rdzv-id) is refused rather than written into the earlier run."""
    launch = launch_id()
    if launch is None:
        return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    earlier = Path(output_root) / "runs" / launch / ".hydra"
    if global_rank() == 0 and earlier.exists():  # only rank 0 writes .hydra/: the others' checks would race it
        raise ConfigError(
            "hydra.run.dir",
            f"{earlier.parent} holds an earlier launch with the same id: start torchrun with a new --rdzv-id "
            "(or --standalone), or give every rank hydra.run.dir=<new folder>",
        )
    return launch


def launch_id() -> str | None:
    """A name that every rank of this launch shares and no other launch has; None for a single process."""
    launcher = external_launcher()
    if launcher == "torchrun":
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # torchrun's default for a static rendezvous: not unique
            raise ConfigError(
                "hydra.run.dir",
                "torchrun was started without a run id: pass --rdzv-id=<unique id> (or --standalone), "
                "or give every rank the same hydra.run.dir=<folder>",
            )
        return f"torchrun-{run_id}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if launcher == "srun":  # a requeued job (preemption) keeps its job id and step ids, not its restart count
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}-{restarts}"
    return None


def rank_suffix() -> str:
    """"" on rank 0, "_rank<r>" elsewhere: each rank of torchrun or srun logs to its own <job name><suffix>.log."""
    rank = global_rank()
    return "" if rank == 0 else f"_rank{rank}"


def check_launch(cfg, multirun: bool, hydra_launcher: str | None) -> None:
    """The processes a launcher started must be the ones the config asks for; a sweep must not run per rank."""
    launcher = external_launcher()
    if launcher is None:
        if multirun and cfg.distributed.num_nodes > 1:
            raise ConfigError(
                "distributed.num_nodes",
                f"a multirun job runs its ranks on this machine; for {cfg.distributed.num_nodes} nodes per job "
                "use hydra/launcher=slurm",
            )
        return
    if multirun and hydra_launcher in ("basic", "joblib"):
        raise ConfigError(
            "hydra/launcher",
            f"a multirun started by {launcher} runs the whole sweep in every rank; start the sweep without "
            f"{launcher} (each job then runs its trainer.devices ranks itself) or use hydra/launcher=slurm",
        )
    per_node, nodes = launcher_world()
    if (cfg.trainer.devices, cfg.distributed.num_nodes) != (per_node, nodes):
        raise ConfigError(
            "trainer.devices",
            f"{launcher} started {per_node} process(es) per node on {nodes} node(s): set trainer.devices={per_node} "
            f"distributed.num_nodes={nodes} (got {cfg.trainer.devices} and {cfg.distributed.num_nodes})",
        )


# `torchrun <args>`, with a failed rank reported by the rank itself (summary.json, its own stderr) and torchrun's
# exit status, rather than by torchrun's traceback of its own ChildFailedError as well.
TORCHRUN = """import sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except ChildFailedError:
    sys.exit(1)
"""


def runs_ranks_as_children(multirun: bool, world_size: int) -> bool:
    """Is this a multirun job on several devices that no launcher started ranks for? It then runs them itself."""
    return multirun and world_size > 1 and external_launcher() is None


def run_ranks(run_dir: Path, devices: int) -> int:
    """Train this multirun job on `devices` processes: `torchrun --standalone` on the same script, config and
    overrides, as a single run into the job's folder (which the job holds, .hydra/ written). Each rank then
    runs as it would alone, and rank 0 writes the job's summary.json. Returns torchrun's exit status."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    script = sys.argv[0] if sys.argv[0].endswith(".py") else Path(os.environ["GPTLAB_ROOT"]) / "scripts" / "train.py"
    main = next((s for s in hydra.runtime.config_sources if s.provider == "main" and s.schema == "file"), None)
    config = [f"--config-path={main.path}"] if main is not None else []
    command = [
        sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc_per_node={devices}", str(script),
        *config, f"--config-name={hydra.job.config_name}", *hydra.overrides.task,
        f"hydra.run.dir={_quoted(run_dir)}",
    ]  # fmt: skip
    from gptlab.run_folder import HELD_BY_JOB  # the job holds the folder and wrote .hydra/ for its ranks

    return subprocess.run(command, env={**os.environ, HELD_BY_JOB: "1"}).returncode


def _quoted(value) -> str:
    """A value for Hydra's override grammar as it is (a sweep job's folder holds `=` and `,`)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def register_resolvers() -> None:
    """The resolvers conf/hydra/default.yaml names its folders with; every entry point calls this before Hydra."""
    # `${gptlab.uid:}`: a random suffix that keeps sweep folders started in the same second apart. Cached, so
    # that every job of a sweep sees the same value (Hydra copies the cache into each job's config).
    OmegaConf.register_new_resolver("gptlab.uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
    # `${gptlab.path:a,b}`: the non-empty parts joined by "/" (a sweep job with no overrides but its seed: `seed=0`).
    OmegaConf.register_new_resolver("gptlab.path", lambda *parts: "/".join(str(p) for p in parts if p), replace=True)
    # `${gptlab.run_name:<output_root>}`: see run_name; cached, so the folder is named once per process.
    OmegaConf.register_new_resolver("gptlab.run_name", run_name, use_cache=True, replace=True)
    # `${gptlab.rank_suffix:}`: "" on rank 0, "_rank<r>" elsewhere.
    OmegaConf.register_new_resolver("gptlab.rank_suffix", rank_suffix, replace=True)
