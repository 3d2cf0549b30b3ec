"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill a job, at its time limit or to make room)
and SIGUSR1 (`#SBATCH --signal=USR1@120`: a warning two minutes ahead) end the run at an optimizer-step boundary.

The step in progress is finished, last.ckpt is saved at it (callbacks/checkpoints.py), the step's metrics line is
written, then the run stops before the next step's first micro-batch: summary.json says `preempted`, the process
exits with status 128 + the signal's number, and under SLURM the job is requeued (`trainer.requeue`), as
Lightning's SLURM plugin does. Rerunning the same command with `ckpt_path=auto` continues exactly.

Lightning's own handler would stop at the next micro-batch, in the middle of gradient accumulation and with no
checkpoint; this one replaces it once training starts (Lightning restores the original handlers at the end).
"""

import os
import signal
import subprocess
import sys
import threading

from lightning.pytorch.utilities import rank_zero_info

from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(OnOptimizerStepEnd):
    """`stopping` turns true at the end of the first optimizer step after a signal, on every rank at once; the
    checkpoint callback saves that step, and the run stops as the next one would begin."""

    def __init__(self, requeue: bool):
        self.requeue = requeue
        self.received: int | None = None  # the signal's number, once one arrived on this rank
        self.stopping = False

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in SIGNALS:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signum

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        # One tiny all-reduce a step: a signal that reached one rank stops them all at the same step.
        self.stopping = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stopping:  # the stopped-at step is saved, logged and evaluated; nothing of the next one has run
            self._stop(trainer)

    def _stop(self, trainer) -> None:
        signum = self.received or signal.SIGTERM  # a rank the signal did not reach stops with its peers
        rank_zero_info(f"{signal.Signals(signum).name}: stopped after step {trainer.global_step:,}, saved in "
                       "checkpoints/last.ckpt; rerun with ckpt_path=auto to continue")  # fmt: skip
        _mark_wandb_preempting()
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        raise Preempted(signum, trainer.global_step)


def requeue_slurm_job() -> None:
    """`scontrol requeue` this SLURM job (an array job's own task), as Lightning's SLURM plugin does; nothing
    outside SLURM. A job submitted with --no-requeue is refused by SLURM: that is reported, not raised."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"SLURM job {job} not requeued: no scontrol on this node", file=sys.stderr)
        return
    if result.returncode == 0:
        rank_zero_info(f"SLURM job {job} requeued")
    else:
        print(f"SLURM job {job} not requeued (scontrol: {result.stderr.strip()})", file=sys.stderr)


def _mark_wandb_preempting() -> None:
    """Tell W&B the run is being preempted (it shows so, and waits for the resumed run to continue it)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.mark_preempting()
