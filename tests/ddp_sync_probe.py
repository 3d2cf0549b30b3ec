"""`python scripts/train.py ...`, plus a record of every gradient all-reduce DDP makes (tests/test_distributed.py).

Run it with the same arguments as scripts/train.py; under distributed=ddp Lightning's launcher re-runs this file
for the other ranks. Each rank writes <run folder>/sync_rank<r>.json: the number of trainable parameter elements,
and per optimizer step the micro-batches it trained on and the buckets (index, is last, elements) that DDP's
communication hook all-reduced."""

import importlib.util
import json
from pathlib import Path

import lightning as L
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gptlab import fit

ROOT = Path(__file__).resolve().parents[1]


class SyncRecorder(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.steps, self.buckets, self.micro_batches = [], [], 0
        ddp = trainer.strategy.model  # the DistributedDataParallel wrapper around the LightningModule
        self.num_params = sum(p.numel() for p in ddp.parameters() if p.requires_grad)
        ddp.register_comm_hook(self.buckets, recording_allreduce)  # before the first backward, as DDP requires

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # After the step's last backward, whose all-reduces DDP has waited for.
        self.steps.append({"micro_batches": self.micro_batches, "buckets": list(self.buckets)})
        self.buckets.clear()
        self.micro_batches = 0

    def on_train_end(self, trainer, pl_module) -> None:
        record = {"num_params": self.num_params, "steps": self.steps}
        (Path(trainer.default_root_dir) / f"sync_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def recording_allreduce(buckets: list, bucket):
    """DDP's default all-reduce (the mean over ranks), noting which bucket it reduces."""
    buckets.append([bucket.index(), bucket.is_last(), bucket.buffer().numel()])
    return allreduce_hook(None, bucket)


def train_script():
    """scripts/train.py as a module: its Hydra entry point, not run on import."""
    spec = importlib.util.spec_from_file_location("gptlab_train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    build_callbacks = fit.build_callbacks
    fit.build_callbacks = lambda *args: [*build_callbacks(*args), SyncRecorder()]
    train_script().main()
