"""The `distributed` group as a Lightning strategy, and FSDP's sharding of the GPT.

- single: Lightning's default for one device.
- ddp / ddp_spawn: Lightning's DDPStrategy. Lightning runs the backward of every micro-step but the last of an
  accumulation inside DDP's no_sync(), so gradients are all-reduced once per optimizer step.
- fsdp: FSDP2 (`fully_shard`) through Lightning's ModelParallelStrategy, which also runs on CPUs (FSDP1 does
  not); GPTModule.configure_model calls `shard_gpt` once the processes are up.
Inside a multirun, a job on several devices runs its ranks as torchrun child processes (gptlab.launch).
"""

from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gptlab.config import DDPConfig, DDPSpawnConfig, FSDPConfig, TrainConfig
from gptlab.files import remove
from gptlab.model import GPT


def build_strategy(cfg: TrainConfig) -> str | Strategy:
    """The Trainer's strategy."""
    d = cfg.distributed
    if isinstance(d, DDPConfig):
        return DDPStrategy(
            start_method="spawn" if isinstance(d, DDPSpawnConfig) else "popen",
            process_group_backend=d.process_group_backend,
            timeout=timedelta(minutes=d.timeout_min),
            find_unused_parameters=d.find_unused_parameters,  # passed on to DistributedDataParallel
            gradient_as_bucket_view=d.gradient_as_bucket_view,
            bucket_cap_mb=d.bucket_cap_mb,
            static_graph=d.static_graph,
        )
    if isinstance(d, FSDPConfig):
        return AtomicModelParallelStrategy(
            data_parallel_size=cfg.trainer.devices * d.num_nodes,
            tensor_parallel_size=1,  # pure data parallelism: every process holds a shard of every layer
            save_distributed_checkpoint=d.state_dict_type == "sharded",
            process_group_backend=d.process_group_backend,
            timeout=timedelta(minutes=d.timeout_min),
        )
    return "auto"


def shard_gpt(model: GPT, mesh, cfg: TrainConfig) -> None:
    """fully_shard each transformer block, then the rest (embeddings, final norm, head), in place.

    FULL_SHARD frees a block's gathered parameters after its forward and gathers them again for its backward
    (ZeRO-3); SHARD_GRAD_OP keeps them until the backward (ZeRO-2: more memory, less communication). Under
    bf16, blocks compute in bf16 and reduce gradients in distributed.reduce_dtype; the sharded master
    weights stay fp32. With model.compile each block is compiled before it is sharded, as torchtitan does."""
    d = cfg.distributed
    policy = _mixed_precision(cfg)
    reshard = d.sharding_strategy == "FULL_SHARD"
    for block in model.transformer.h:
        if cfg.model.compile:
            block.compile()
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a norm of FSDP's sharded parameters or gradients (a DTensor) is reduced over the ranks."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _mixed_precision(cfg: TrainConfig) -> MixedPrecisionPolicy:
    if cfg.precision.trainer_precision == "bf16-mixed":
        reduce_dtype = getattr(torch, cfg.distributed.reduce_dtype)
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    return MixedPrecisionPolicy()  # fp32 and tf32 compute in fp32; under bf16_true the weights are bf16 already


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """A sharded checkpoint is a folder each rank writes its shard into: it is written under a temporary name
    and renamed into place once every rank is done, so a kill during a save leaves the previous one whole
    (gptlab.callbacks.checkpoints.AtomicCheckpointIO does the same for single-file checkpoints)."""

    def __init__(self, *args, save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(*args, save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.sharded_checkpoints = save_distributed_checkpoint

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            remove(tmp)  # left by a run killed while saving
        self.barrier("sharded_checkpoint_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded_checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            remove(old)
        self.barrier("sharded_checkpoint_renamed")
