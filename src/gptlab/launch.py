"""Who started this process, and which run folder it writes into.

A training job runs as one process, or as one process per device started by one of:
- Lightning itself (`trainer.devices=N`): it re-runs the command line for ranks 1..N-1 and hands them the
  run folder (`hydra.run.dir`); inside a multirun gptlab has it spawn the ranks instead (see `spawn_ranks`);
- torchrun (`torchrun --nproc_per_node=N scripts/train.py ...`) or SLURM's srun: every rank runs Hydra on its
  own, so the run folder's name is drawn by rank 0 and read by the others (`shared_run_name`), and only
  rank 0 writes Hydra's .hydra/ folder.
This module imports no torch or Lightning: Hydra's resolvers and the config checks use it before they load.
"""

import atexit
import contextlib
import os
import re
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path

from gptlab.errors import ConfigError, UserInputError

RENDEZVOUS_DIR = ".launches"  # in <output_root>/runs: rank 0's run folder name, per launch
RENDEZVOUS_TIMEOUT_S = 600.0  # how long ranks > 0 wait for rank 0 to name the run folder


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


def shared_run_name(output_root: str) -> str:
    """`<date>_<time>_<random>`: the run folder's name. Under torchrun or srun rank 0 draws it and writes it
    to <output_root>/runs/.launches/<launch id>; the other ranks wait for that file, so all ranks write into
    rank 0's folder and no other folder appears. Rank 0 deletes the file when it exits: by then every rank
    has read it (they all joined its process group), and a later launch that reuses the id (the same
    --rdzv-id) cannot read a stale name before its own rank 0 has written one."""
    name = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    launch = _launch_id()
    if launch is None:
        return name
    note = Path(output_root) / "runs" / RENDEZVOUS_DIR / launch
    if global_rank() == 0:
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_name(f".{note.name}.tmp")
        tmp.write_text(name)
        os.replace(tmp, note)  # the other ranks never read half a name
        atexit.register(note.unlink, missing_ok=True)
        return name
    deadline = time.monotonic() + RENDEZVOUS_TIMEOUT_S
    while not note.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not name the run folder in {note} within {RENDEZVOUS_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    return note.read_text().strip()


def _launch_id() -> str | None:
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


def rank_zero_only_value(value):
    """`value` on rank 0 and None elsewhere (hydra.output_subdir: only rank 0 writes .hydra/)."""
    return value if global_rank() == 0 else None


def rank_suffix() -> str:
    """"" on rank 0, "_rank<r>" elsewhere: each rank of torchrun or srun logs to its own <job name><suffix>.log."""
    rank = global_rank()
    return "" if rank == 0 else f"_rank{rank}"


def check_launch(cfg, multirun: bool, hydra_launcher: str | None) -> None:
    """The processes a launcher started must be the ones the config asks for; a sweep must not run per rank."""
    launcher = external_launcher()
    if launcher is None:
        return
    if multirun and hydra_launcher in ("basic", "joblib"):
        raise ConfigError(
            "hydra/launcher",
            f"a multirun started by {launcher} runs the whole sweep in every rank; start the sweep without "
            f"{launcher} (each job then spawns its trainer.devices ranks) or use hydra/launcher=slurm",
        )
    per_node, nodes = launcher_world()
    if (cfg.trainer.devices, cfg.distributed.num_nodes) != (per_node, nodes):
        raise ConfigError(
            "trainer.devices",
            f"{launcher} started {per_node} process(es) per node on {nodes} node(s): set trainer.devices={per_node} "
            f"distributed.num_nodes={nodes} (got {cfg.trainer.devices} and {cfg.distributed.num_nodes})",
        )


class SpawnedRankError(UserInputError):
    """A UserInputError (a config mistake, bad data, a diverged run) that a rank started by
    torch.multiprocessing.spawn raised, with that error's label, status and message."""

    def __init__(self, error_class: type[UserInputError], message: str):
        super().__init__(message)
        self.label, self.status = error_class.label, error_class.status


@contextlib.contextmanager
def spawned_rank_errors():
    """Re-raise a gptlab user error of a spawned rank (ddp_spawn, and ddp inside a multirun) as one.

    torch.multiprocessing hands the launching process only the text of the rank's traceback (a
    ProcessRaisedException): without this a diverged run would be recorded as "failed" with a traceback,
    where the same run under torchrun or Lightning's own launcher is "diverged" with one line."""
    from torch.multiprocessing import ProcessRaisedException

    try:
        yield
    except ProcessRaisedException as e:
        error = _user_error_in_traceback(e.msg)
        if error is None:
            raise
        raise error from e


def _user_error_in_traceback(text: str) -> SpawnedRankError | None:
    """The UserInputError that a formatted traceback ends with (`gptlab.<module>.<Class>: <message>`), if any."""
    raised = list(re.finditer(r"^(gptlab(?:\.\w+)*)\.(\w+): ", text, re.MULTILINE))
    if not raised:
        return None
    module, name = raised[-1].groups()
    error_class = getattr(sys.modules.get(module), name, None)  # the launching process built the same objects
    if not (isinstance(error_class, type) and issubclass(error_class, UserInputError)):
        return None
    return SpawnedRankError(error_class, text[raised[-1].end() :].strip())
