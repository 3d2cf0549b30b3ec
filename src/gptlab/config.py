"""The training config: the root schema and its plumbing groups, the rules that span groups, and loading.

Every group's schema lives beside the code that uses it (gptlab/model_config.py, optim.py, schedules.py,
data/config.py, callbacks/config.py, eval/config.py); the plumbing that builds the Trainer (precision,
distributed, logger, trainer, paths) is here. Hydra composes conf/ on top of these schemas (`train_schema`
heads conf/train.yaml), so each option states only what differs from its schema.

`load_config` turns the composed config into a checked TrainConfig, once, before torch or Lightning load:
types and unknown keys (gptlab.schema.typed), every field's rule (gptlab.schema.check), then the rules that
span groups (`validate`), which also settle the budget and derive the RunPlan.
"""

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from gptlab import optim, schedules  # noqa: F401 (registers the optimizer and scheduler options)
from gptlab.callbacks.config import CallbacksConfig
from gptlab.data.config import DataConfig
from gptlab.errors import ConfigError
from gptlab.eval.config import EvalConfig
from gptlab.model_config import GPTConfig
from gptlab.schema import (
    OPTIONS,
    at_least,
    check,
    knob,
    load,
    non_negative,
    one_of,
    option,
    optional,
    positive,
    require,
    resolve,
    schema_of,
    typed,
)

PRECISION_FLAGS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")  # Lightning's


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # the option (conf/precision/<name>.yaml)
    trainer_precision: str = knob("32-true", one_of(*PRECISION_FLAGS))  # Lightning's precision flag
    # torch.set_float32_matmul_precision: highest (fp32) | high (TF32 tensor cores) | medium (bf16)
    matmul_precision: str = knob("highest", one_of("highest", "high", "medium"))


@dataclass
class DistributedConfig:
    name: str = MISSING  # the option (conf/distributed/<name>.yaml)
    num_nodes: int = knob(1, at_least(1))  # machines; each runs trainer.devices processes


@option("distributed")
@dataclass
class SingleDeviceConfig(DistributedConfig):
    """One process on one device (CPU, a GPU or MPS)."""

    name: str = "single"


@dataclass
class ProcessGroupConfig(DistributedConfig):
    """What DDP and FSDP share: the process group their collectives run in."""

    process_group_backend: Optional[str] = knob(None, optional(one_of("nccl", "gloo")))  # null: nccl on GPU, else gloo
    timeout_min: float = knob(30.0, positive)  # a collective waiting longer than this fails the run instead of hanging


@option("distributed")
@dataclass
class DDPConfig(ProcessGroupConfig):
    """Lightning's DDPStrategy: a replica of the model per process, gradients all-reduced once per optimizer step."""

    name: str = "ddp"
    find_unused_parameters: bool = False  # every GPT parameter gets a gradient: the extra graph walk would be waste
    gradient_as_bucket_view: bool = True  # gradients are views into the all-reduce buckets: one copy of them less
    bucket_cap_mb: float = knob(25.0, positive)  # gradients per all-reduce bucket in MB (PyTorch's default)
    static_graph: bool = False  # promise DDP the same graph every step (some extra overlap)


@option("distributed")
@dataclass
class DDPSpawnConfig(DDPConfig):
    """DDP whose processes torch.multiprocessing.spawn starts instead of re-running the command line."""

    name: str = "ddp_spawn"


@option("distributed")
@dataclass
class FSDPConfig(ProcessGroupConfig):
    """FSDP2 (torch.distributed.fsdp.fully_shard) through Lightning's ModelParallelStrategy: parameters,
    gradients and optimizer states sharded over the processes, one FSDP unit per transformer block."""

    name: str = "fsdp"
    # FULL_SHARD (ZeRO-3: re-gather each block in backward) | SHARD_GRAD_OP (ZeRO-2: keep it)
    sharding_strategy: str = knob("FULL_SHARD", one_of("FULL_SHARD", "SHARD_GRAD_OP"))
    # gradient reduce-scatter dtype under precision=bf16 (bfloat16: half the traffic)
    reduce_dtype: str = knob("float32", one_of("float32", "bfloat16"))
    # checkpoints: sharded (a folder, each rank writes its shard) | full (one file)
    state_dict_type: str = knob("sharded", one_of("sharded", "full"))


@dataclass
class LoggerConfig:
    name: str = MISSING  # the option (conf/logger/<name>.yaml)


@option("logger")
@dataclass
class WandbLoggerConfig(LoggerConfig):
    """Weights & Biases, offline by default: the run is stored in <run folder>/wandb/; `wandb sync` it later."""

    name: str = "wandb"
    project: str = "gptlab"
    entity: Optional[str] = None
    mode: str = knob("offline", one_of("offline", "online", "disabled"))  # WANDB_MODE, when set, overrides it
    group: Optional[str] = None  # groups runs in the W&B UI; null: a sweep's jobs are grouped by the sweep folder
    job_type: str = "train"


@option("logger")
@dataclass
class NoLoggerConfig(LoggerConfig):
    """No experiment tracker; the run folder still gets metrics.jsonl and summary.json."""

    name: str = "none"


@dataclass
class TrainerConfig:
    accelerator: str = knob("auto", one_of("auto", "cpu", "gpu", "cuda", "mps"))
    devices: int = knob(1, at_least(1))  # devices per node
    max_steps: Optional[int] = knob(None, optional(at_least(1)))  # the budget in optimizer steps (see BUDGET_KEYS)
    log_every_n_steps: int = knob(1, at_least(1))  # how often metrics reach the loggers
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower)
    detect_anomaly: bool = False  # autograd anomaly detection: a NaN/Inf backward names its forward op (slow)
    stopping_threshold: Optional[float] = knob(None, optional(positive))  # stop once train/loss < this; null: never
    requeue: bool = True  # under SLURM, requeue the job after a preemption signal stopped it (callbacks/preemption.py)


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:GPTLAB_ROOT,.}"  # the repository (scripts set GPTLAB_ROOT)
    data_dir: str = "${oc.env:GPTLAB_DATA_DIR,${paths.root_dir}/data}"  # prepared datasets; GPTLAB_DATA_DIR moves them
    output_root: str = "${paths.root_dir}/outputs"
    output_dir: str = "${hydra:runtime.output_dir}"  # this run's folder


@dataclass
class TrainConfig:
    seed: int = knob(1337, non_negative)  # seeds Python, NumPy, torch and the data order; 0 is valid
    global_batch_tokens: int = knob(4096, positive)  # tokens per optimizer step, across devices and micro-steps
    # the budget: one of BUDGET_KEYS (the others null), each rounded down to whole steps of global_batch_tokens
    max_tokens: Optional[int] = knob(196608, optional(positive))  # in tokens (48 steps)
    tokens_per_param: Optional[float] = knob(None, optional(positive))  # D = ratio x N (Chinchilla-optimal: ~20)
    flops: Optional[float] = knob(None, optional(positive))  # training FLOPs C: D = C / FLOPs per token (6N + 12LHQT)
    grad_clip: float = knob(1.0, non_negative)  # clip the global gradient norm to this; 0 disables clipping
    # NaN/Inf loss or gradients: stop (error naming the step) | skip (drop the update; counted as nan_skipped)
    on_nan: str = knob("stop", one_of("stop", "skip"))
    # resume: a .ckpt file, a run folder (its newest checkpoint), or auto: this run's folder's newest, else start fresh
    ckpt_path: Optional[str] = None
    overwrite: bool = False  # start afresh in a run folder that holds another run's results, deleting them first
    tags: list[str] = knob([])  # free-form labels, passed to W&B
    model: GPTConfig = field(default_factory=GPTConfig)
    optimizer: Any = MISSING  # an optim.OptimizerConfig
    scheduler: Any = MISSING  # a schedules.ScheduleConfig
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: Any = MISSING  # a DistributedConfig
    logger: Any = MISSING  # a LoggerConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


ConfigStore.instance().store(name="train_schema", node=TrainConfig)  # conf/train.yaml starts from it
UNION_GROUPS = ("optimizer", "scheduler", "distributed", "logger")  # options with different fields: see @option
BUDGET_KEYS = ("max_tokens", "trainer.max_steps", "tokens_per_param", "flops")


@dataclass(frozen=True)
class RunPlan:
    """Quantities derived from the config: how the budget becomes optimizer steps."""

    world_size: int
    grad_accum: int  # micro-steps per optimizer step
    total_steps: int
    tokens_per_step: int
    # the key that set total_steps, where it came from, and what it resolved to, e.g. "trainer.max_steps=500 (command
    # line)" or "tokens_per_param=20 (config) -> 1,234,560 tokens (N = 61,728 parameters)"
    budget: str = ""

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step


def load_config(cfg: DictConfig | dict, command_line: Sequence[str] | None = None) -> tuple[TrainConfig, RunPlan]:
    """The composed config as a checked TrainConfig, and its run plan; a ConfigError names the first bad key.

    command_line: the overrides the user typed (by default Hydra's, for this job); a budget key given there wins
    over the config's other budget key."""
    from gptlab.sweep import hydra_overrides

    train = to_train_config(cfg)
    check(train)
    return validate(train, hydra_overrides() if command_line is None else command_line)


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Resolved and typed, defaults filled in: wrong types, unknown keys and missing values are ConfigErrors."""
    raw = resolve(cfg)
    groups = {}
    for group in UNION_GROUPS:
        if not isinstance(raw.get(group), dict):
            raise ConfigError(group, f"missing config group; pick one of: {', '.join(OPTIONS[group])}")
        schema = schema_of(group, cfg.get(group) if isinstance(cfg, DictConfig) else raw[group])
        groups[group] = typed(schema, raw.pop(group), group)
        require(
            groups[group].name == schema.name,
            f"{group}.name",
            f"names the option and comes with it: pick another with {group}=<option> "
            f"(got {groups[group].name!r} for {group}={schema.name})",
        )
    root = typed(TrainConfig, {**raw, **{group: None for group in UNION_GROUPS}})
    return dataclasses.replace(root, **groups)


def validate(cfg: TrainConfig, command_line: Sequence[str] = ()) -> tuple[TrainConfig, RunPlan]:
    """The rules that span groups, once every group has passed its own. Returns the config with the one budget
    key that counts (the other set to null) and the run plan."""
    from gptlab.launch import check_launch
    from gptlab.sweep import hydra_launcher, in_multirun

    world = cfg.trainer.devices * cfg.distributed.num_nodes
    require(
        not isinstance(cfg.distributed, SingleDeviceConfig) or world == 1,
        "trainer.devices",
        f"distributed=single runs one process on one device (got {world} devices); "
        "pick distributed=ddp or distributed=fsdp for more",
    )
    per_micro_step = cfg.data.micro_batch_size * cfg.data.seq_len * world
    require(
        cfg.global_batch_tokens % per_micro_step == 0,
        "global_batch_tokens",
        f"must be a positive multiple of data.micro_batch_size x data.seq_len x devices "
        f"= {cfg.data.micro_batch_size} x {cfg.data.seq_len} x {world} = {per_micro_step} "
        f"(got {cfg.global_batch_tokens})",
    )
    cfg, total_steps, budget = _budget(cfg, command_line)
    require(
        cfg.data.seq_len <= cfg.model.block_size,
        "data.seq_len",
        f"must be <= model.block_size={cfg.model.block_size} (got {cfg.data.seq_len})",
    )
    require(
        not (isinstance(cfg.distributed, FSDPConfig) and cfg.precision.trainer_precision == "16-mixed"),
        "precision",
        "distributed=fsdp runs fp32, tf32, bf16 or bf16_true; fp16 needs a sharded gradient scaler, which "
        "Lightning's ModelParallelStrategy does not have (use precision=bf16)",
    )
    check_launch(cfg, in_multirun(), hydra_launcher())  # torchrun/srun started the processes the config asks for
    grad_accum = cfg.global_batch_tokens // per_micro_step
    return cfg, RunPlan(world, grad_accum, total_steps, cfg.global_batch_tokens, budget)


def _budget(cfg: TrainConfig, command_line: Sequence[str]) -> tuple[TrainConfig, int, str]:
    """One budget, one of BUDGET_KEYS. The one given on the command line wins; otherwise the config must set exactly
    one. Returns the config with the others set to null, the optimizer steps, and which key set them from where
    (and what it came to), e.g. "trainer.max_steps=500 (command line)"."""
    values = {
        "max_tokens": cfg.max_tokens,
        "trainer.max_steps": cfg.trainer.max_steps,
        "tokens_per_param": cfg.tokens_per_param,
        "flops": cfg.flops,
    }
    on_command_line = _keys_set(command_line)
    given = [key for key in BUDGET_KEYS if key in on_command_line and values[key] is not None]
    if len(given) > 1:
        raise ConfigError(
            given[-1],
            f"and {_and(given[:-1])} are {_both(given)} on the command line ({_listed(values, given)}): give one of "
            f"them, the budget is one of {', '.join(BUDGET_KEYS)}",
        )
    in_config = [key for key in BUDGET_KEYS if values[key] is not None]
    require(
        in_config != [],
        "max_tokens",
        "no budget: set max_tokens=<tokens> or trainer.max_steps=<steps> (or tokens_per_param=<tokens per parameter>"
        ", flops=<training FLOPs>)",
    )
    if not given and len(in_config) > 1:
        raise ConfigError(
            in_config[-1],
            f"and {_and(in_config[:-1])} {_both(in_config)} set a budget in the config ({_listed(values, in_config)})"
            ": set all but one of them to null, or give the one you want on the command line",
        )
    key, source = (given[0], "command line") if given else (in_config[0], "config")
    cfg = dataclasses.replace(
        cfg,
        **{k: values[k] if k == key else None for k in ("max_tokens", "tokens_per_param", "flops")},
        trainer=dataclasses.replace(cfg.trainer, max_steps=values[key] if key == "trainer.max_steps" else None),
    )
    if key == "trainer.max_steps":
        return cfg, cfg.trainer.max_steps, f"{key}={values[key]} ({source})"
    tokens, resolved = _budget_tokens(cfg, key)
    batch = cfg.global_batch_tokens
    require(
        tokens >= batch,
        key,
        f"must come to at least one step of global_batch_tokens={batch} (got {key}={_number(values[key])}{resolved})",
    )
    return cfg, tokens // batch, f"{key}={_number(values[key])} ({source}){resolved}"


def _budget_tokens(cfg: TrainConfig, key: str) -> tuple[int, str]:
    """The tokens a budget in tokens, tokens per parameter or FLOPs comes to, and for the last two how (" -> ...").
    N and FLOPs per token are gptlab.flops' (it loads torch: imported only for these two budgets). N is every
    parameter but the position embedding, the N of the FLOP count (a lookup costs no FLOPs; the token embedding
    stays, as it is also the output head), so that D = C / (6N + attention) and D / N speak of the same N."""
    if key == "max_tokens":
        return cfg.max_tokens, ""
    from gptlab.flops import flops_per_token, non_embedding_params

    n = non_embedding_params(cfg.model)
    if key == "tokens_per_param":
        tokens = int(cfg.tokens_per_param * n)
        return tokens, f" -> {tokens:,} tokens (N = {n:,} parameters)"
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens = int(cfg.flops // per_token)
    return tokens, f" -> {tokens:,} tokens ({per_token:,} FLOPs per token = 6N + 12LHQT, N = {n:,} parameters)"


def _and(keys: list[str]) -> str:
    return " and ".join(keys)


def _both(keys: list[str]) -> str:
    return "both" if len(keys) == 2 else "all"


def _listed(values: dict, keys: list[str]) -> str:
    return ", ".join(f"{key}={_number(values[key])}" for key in keys)


def _number(value: int | float) -> str:
    """As the user would type it: 196608, 20, 1e+15."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _keys_set(overrides: Sequence[str]) -> set[str]:
    """The keys that command-line overrides set (group choices and deletions are not key values)."""
    if not overrides:
        return set()
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if not o.is_delete()}


@dataclass
class PrepareDataConfig:
    """The root of scripts/prepare_data.py (conf/prepare.yaml): a data option, and where things are."""

    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


ConfigStore.instance().store(name="prepare_schema", node=PrepareDataConfig)


def load_data_config(cfg: DictConfig | dict) -> DataConfig:
    """The `data` group of a composed config (scripts/prepare_data.py's, or a training one), checked."""
    return load(DataConfig, resolve(cfg).get("data") or {}, "data")


CHECKPOINTS_DIR = "checkpoints"  # in a run folder: last.ckpt and the periodic step_XXXXXX.ckpt
LAST_CHECKPOINT = "last.ckpt"  # always the newest checkpoint of the run
STEP_FILE = re.compile(r"step_(\d{6,})\.ckpt")  # the periodic ones: step_000500.ckpt
SHARDED_META = "meta.pt"  # in a sharded checkpoint folder: all but the model and optimizer shards (Lightning's name)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder of checkpoint shards, as distributed=fsdp writes with state_dict_type=sharded (Lightning's test)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_META))
