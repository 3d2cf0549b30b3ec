"""The typed schema of a training config, and the checks that run before any expensive work.

Hydra composes `conf/`; `load_config` turns the result into typed dataclasses, rejecting wrong types,
unknown keys and inconsistent values with a `ConfigError` that names the offending key. Groups whose
options carry different knobs (optimizer, scheduler, data, logger, ...) pick their schema by `name`.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gptlab.errors import ConfigError, UserInputError  # noqa: F401 (ConfigError: imported from here too)
from gptlab.model import ATTENTIONS, INITS, NORM_POSITIONS, NORMS, GPTConfig

GPT2_VOCAB = 50257  # ids the GPT-2 tokenizer can produce; the model's vocab_size must cover them


# Optimizer options (gptlab/optim.py). Knobs are named as torch.optim names them; `lr` is the peak LR the
# scheduler multiplies; `weight_decay` applies to >=2-D weights only (biases and norm weights never decay).


@dataclass
class AdamWConfig:
    """AdamW (Loshchilov & Hutter 2019): decoupled decay, theta <- theta - lr * weight_decay * theta."""

    name: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    decay_embeddings: bool = True  # also decay the (tied) token and position embeddings
    fused: Optional[bool] = None  # the fused kernel; null: on CUDA only


@dataclass
class AdamConfig:
    """Adam with coupled L2: weight_decay * theta is added to the gradient, then normalised with it."""

    name: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    decay_embeddings: bool = True
    fused: Optional[bool] = None


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 0.0  # coupled L2, added to the gradient
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = True  # needs momentum > 0 and dampening 0
    decay_embeddings: bool = True


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    lr: float = 1e-3
    weight_decay: float = 0.0  # coupled L2
    alpha: float = 0.99  # smoothing constant of the squared-gradient average
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False  # normalise by the gradient's variance estimate instead of its second moment
    decay_embeddings: bool = True


@dataclass
class AdagradConfig:
    name: str = "adagrad"
    lr: float = 1e-2
    weight_decay: float = 0.0  # coupled L2
    lr_decay: float = 0.0  # lr / (1 + (step - 1) * lr_decay)
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    decay_embeddings: bool = True


@dataclass
class MuonAdamWConfig:
    """The AdamW that steps what Muon does not: embeddings, the output head, biases and norm weights."""

    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled, on the embeddings and an untied head only


@dataclass
class MuonConfig:
    """torch.optim.Muon (Jordan et al. 2024) on the 2-D weights inside the transformer blocks."""

    name: str = "muon"
    lr: float = 0.02
    weight_decay: float = 0.0  # decoupled
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.775, 2.0315])
    eps: float = 1e-7
    ns_steps: int = 5  # Newton-Schulz iterations
    adjust_lr_fn: Optional[str] = None  # null/original: lr * sqrt(max(1, rows/cols)); match_rms_adamw
    adamw: MuonAdamWConfig = field(default_factory=MuonAdamWConfig)


OptimizerConfig = AdamWConfig | AdamConfig | SGDConfig | RMSpropConfig | AdagradConfig | MuonConfig


# Scheduler options (gptlab/schedules.py): multipliers of each param group's LR, per optimizer step. In all but
# inverse_sqrt, step s < warmup_steps uses (s + 1) / warmup_steps, and the schedule's own clock starts after it.


@dataclass
class CosineConfig:
    name: str = "cosine"
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the LR decays to min_lr = min_lr_ratio * optimizer.lr


@dataclass
class LinearConfig:
    name: str = "linear"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # linear decay to min_lr_ratio * optimizer.lr at the end of the run


@dataclass
class WSDConfig:
    """Warmup-stable-decay (Hu et al. 2024 MiniCPM; Hägele et al. 2024)."""

    name: str = "wsd"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # the last fraction of the run's steps decays; in (0, 1]
    decay_shape: str = "linear"  # linear | 1-sqrt (Hägele et al. 2024)
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * optimizer.lr

    def decay_steps(self, total_steps: int) -> int:
        return max(1, round(self.decay_fraction * total_steps))


@dataclass
class InverseSqrtConfig:
    """Vaswani et al. 2017: lr * d_model^-0.5 * min(n^-0.5, n * warmup_steps^-1.5), n = step + 1 (lr=1: the paper)."""

    name: str = "inverse_sqrt"
    warmup_steps: int = 0  # the rule's own warmup (the paper: 4000); 0: none
    d_model: Optional[int] = None  # null: model.n_embd


@dataclass
class StepConfig:
    name: str = "step"
    warmup_steps: int = 0
    step_size: int = 16  # StepLR: multiply the LR by gamma every step_size optimizer steps
    gamma: float = 0.5


@dataclass
class ExponentialConfig:
    name: str = "exponential"
    warmup_steps: int = 0
    gamma: float = 0.95  # ExponentialLR: multiply the LR by gamma every optimizer step


@dataclass
class CosineRestartsConfig:
    """SGDR (Loshchilov & Hutter 2017), as torch's CosineAnnealingWarmRestarts."""

    name: str = "cosine_restarts"
    warmup_steps: int = 0
    T_0: int = 10  # optimizer steps in the first cosine cycle
    T_mult: int = 2  # each cycle is T_mult times longer than the one before
    min_lr_ratio: float = 0.0  # eta_min = min_lr_ratio * optimizer.lr


@dataclass
class ConstantConfig:
    name: str = "constant"
    warmup_steps: int = 0  # optional linear warmup, then optimizer.lr throughout


SchedulerConfig = (
    CosineConfig | LinearConfig | WSDConfig | InverseSqrtConfig | StepConfig | ExponentialConfig
    | CosineRestartsConfig | ConstantConfig
)
WSD_SHAPES = ("linear", "1-sqrt")


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    trainer_precision: str = "32-true"  # Lightning's precision flag
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision: highest | high (TF32) | medium


@dataclass
class FilterConfig:
    """Keep a document only if its `field` (dotted for nested, e.g. meta.redpajama_set_name) passes."""

    field: str = MISSING
    min: Optional[float] = None  # keep values >= min
    max: Optional[float] = None  # keep values <= max
    one_of: Optional[list[str]] = None  # keep values in this list


@dataclass
class PrepareConfig:
    """How scripts/prepare_data.py turns the source into shards."""

    workers: int = 2  # tokenizer processes
    max_docs: Optional[int] = None  # stop after this many kept training documents (a sample of the source)
    max_tokens: Optional[int] = None  # stop after this many training tokens
    shard_tokens: int = 100_000_000  # tokens per shard (uint16: 200 MB)
    filters: list[FilterConfig] = field(default_factory=list)


@dataclass
class DataConfig:
    name: str = "sample"  # sample | fineweb_edu | fineweb | slimpajama | local
    source: str = MISSING  # a hub dataset id, or local files (a file, folder or glob) in the same schema
    hub_config: Optional[str] = None  # the hub dataset's configuration, e.g. sample-10BT
    train_split: str = "train"  # the hub split to train on
    val_source: Optional[str] = None  # the source's own validation data: a hub split name or local files;
    # null: hold out val_fraction of the documents, chosen by a hash of their id
    val_fraction: float = 0.0005
    text_field: str = "text"
    id_field: Optional[str] = "id"  # null: a document's id is its source file and row
    dir: str = MISSING  # folder of prepared shards
    verify_checksums: bool = True  # hash every shard against the manifest before training
    seq_len: int = 1024  # tokens per training sequence (T)
    micro_batch_size: int = 16  # sequences per forward pass per device (B)
    num_workers: int = 0  # DataLoader worker processes
    shuffle: bool = True  # a seeded permutation of documents each epoch; false: read shards in order
    shuffle_seed: Optional[int] = None  # null: the run's seed
    align_to_documents: bool = False  # start sequences at document starts (see gptlab/data/shuffle.py)
    overfit_batches: int = 0  # > 0: train on the first N micro-batches only, repeated (debug=overfit)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class SingleDeviceConfig:
    name: str = "single"
    num_nodes: int = 1


@dataclass
class DDPConfig:
    """Lightning's DDPStrategy: a replica of the model per process, gradients all-reduced once per optimizer step."""

    name: str = "ddp"  # ddp: Lightning re-runs the command per rank | ddp_spawn: torch.multiprocessing.spawn
    num_nodes: int = 1
    process_group_backend: Optional[str] = None  # nccl | gloo; null: nccl on GPUs, gloo on CPUs
    timeout_min: float = 30.0  # a collective waiting longer than this fails the run instead of hanging
    find_unused_parameters: bool = False  # every GPT parameter gets a gradient: the extra graph walk is waste
    gradient_as_bucket_view: bool = True  # gradients are views into the all-reduce buckets: one copy less
    bucket_cap_mb: float = 25.0  # gradients per all-reduce bucket (PyTorch's default)
    static_graph: bool = False  # DDP's static_graph: the same graph every step, for some extra overlap


@dataclass
class FSDPConfig:
    """FSDP2 (torch.distributed.fsdp.fully_shard) through Lightning's ModelParallelStrategy: parameters,
    gradients and optimizer states sharded over the processes, one FSDP unit per transformer block."""

    name: str = "fsdp"
    num_nodes: int = 1
    process_group_backend: Optional[str] = None  # nccl | gloo; null: nccl on GPUs, gloo on CPUs
    timeout_min: float = 30.0  # a collective waiting longer than this fails the run instead of hanging
    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD (ZeRO-3) | SHARD_GRAD_OP (ZeRO-2: no re-gather in backward)
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter under bf16 (bfloat16: half the traffic)
    state_dict_type: str = "sharded"  # checkpoints: sharded (a folder, each rank writes its shard) | full (one file)


@dataclass
class WandbLoggerConfig:
    name: str = "wandb"
    project: str = "gptlab"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    job_type: str = "train"


@dataclass
class CsvLoggerConfig:
    name: str = "csv"


@dataclass
class NoLoggerConfig:
    name: str = "none"


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # cpu | gpu | cuda | mps | auto
    devices: int = 1  # devices per node
    max_steps: int = 1000  # optimizer steps; ignored when max_tokens is set
    log_every_n_steps: int = 10
    deterministic: bool = False  # torch.use_deterministic_algorithms
    detect_anomaly: bool = False  # torch.autograd anomaly detection: name the forward op of a NaN backward (slow)
    stopping_threshold: Optional[float] = None  # stop once train/loss < this (debug=overfit); null: never


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500  # checkpoints/step_XXXXXX.ckpt and last.ckpt every N steps; last.ckpt also at the end
    save_top_k: int = -1  # how many periodic checkpoints to keep, newest first (-1: all)


@dataclass
class ProfilerConfig:
    """torch.profiler over a few optimizer steps: a chrome trace in <run>/profile/ and a table of the top ops."""

    enabled: bool = False
    wait: int = 1  # optimizer steps skipped first (torch.profiler.schedule's names)
    warmup: int = 1  # steps traced, then discarded (the profiler's own start-up)
    active: int = 2  # steps recorded into the trace
    record_shapes: bool = True  # input shapes of each op
    profile_memory: bool = True  # tensor memory allocated and freed by each op
    with_stack: bool = False  # Python stack of each op (bigger trace)
    sort_by: str = "self_cpu_time_total"  # column the printed table is sorted by
    row_limit: int = 15  # rows of the printed table (0: no table)


@dataclass
class LossSpikeConfig:
    enabled: bool = True
    window: int = 50  # running mean and std over the train losses of the last N optimizer steps
    k: float = 4.0  # a spike: loss > mean + k * std
    min_steps: int = 20  # losses in the window before detection starts


@dataclass
class MonitorConfig:
    """Training dynamics, logged by gptlab/callbacks/monitor.py."""

    grad_norm: bool = True  # global gradient norm before clipping, every step (grad_norm)
    lr: bool = True  # learning rate (lr; lr/<group> where parameter groups differ)
    loss_scale: bool = True  # fp16: dynamic loss scale (loss_scale) and overflow-skipped steps (skipped_steps)
    param_norm: bool = True  # global weight norm (param_norm), every every_n_steps
    update_ratio: bool = True  # per-layer |delta theta| / |theta| of one step (update_ratio/*), every every_n_steps
    every_n_steps: int = 10  # how often param_norm and update_ratio are measured
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    on_nan: str = "stop"  # non-finite loss or gradients: stop (error naming the step) | skip (drop the update)


@dataclass
class CallbacksConfig:
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    progress_bar_refresh_rate: int = 1  # 0 hides the progress bar


@dataclass
class HellaSwagConfig:
    enabled: bool = True
    path: Optional[str] = None  # a local hellaswag_val.jsonl; null: the copy cached in cache_dir
    cache_dir: str = MISSING  # where the downloaded file is kept
    download: bool = True  # fetch the file into cache_dir once, when it is not there and the network is
    if_missing: str = "warn"  # no file: warn (once) and train without it, or fail
    every_n_steps: int = 0  # also score during training every N optimizer steps (0: only at the end)
    limit: Optional[int] = None  # score the first N of the 10,042 examples; null: all
    batch_size: int = 32  # examples (4 rows each) per forward pass


@dataclass
class EvalConfig:
    every_n_steps: int = 50  # validation loss every N optimizer steps and at the end
    at_start: bool = True  # also validate before the first step (the run's starting loss)
    val_tokens: int = 16384  # held-out tokens each validation reads (a fixed prefix of the val split)
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_root: str = MISSING
    output_dir: str = MISSING  # this run's folder (Hydra's output dir)


@dataclass
class TrainConfig:
    seed: int = 1337  # any integer >= 0, 0 included
    global_batch_tokens: int = 4096  # tokens per optimizer step, across devices and micro-steps
    max_tokens: Optional[int] = None  # training budget in tokens; null uses trainer.max_steps
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    ckpt_path: Optional[str] = None  # resume from a .ckpt file or a run folder (its checkpoints/last.ckpt)
    tags: list[str] = field(default_factory=list)
    model: GPTConfig = field(default_factory=GPTConfig)
    optimizer: Any = None
    scheduler: Any = None
    precision: Any = None
    data: Any = None
    distributed: Any = None
    logger: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# Groups whose options have different fields: option name -> schema.
SCHEMAS: dict[str, dict[str, type]] = {
    "optimizer": {
        "adamw": AdamWConfig,
        "adam": AdamConfig,
        "sgd": SGDConfig,
        "rmsprop": RMSpropConfig,
        "adagrad": AdagradConfig,
        "muon": MuonConfig,
    },
    "scheduler": {
        "cosine": CosineConfig,
        "linear": LinearConfig,
        "wsd": WSDConfig,
        "inverse_sqrt": InverseSqrtConfig,
        "step": StepConfig,
        "exponential": ExponentialConfig,
        "cosine_restarts": CosineRestartsConfig,
        "constant": ConstantConfig,
    },
    "precision": {name: PrecisionConfig for name in ("fp32", "tf32", "bf16", "fp16", "bf16_true")},
    "data": {name: DataConfig for name in ("sample", "fineweb_edu", "fineweb", "slimpajama", "local")},
    "distributed": {"single": SingleDeviceConfig, "ddp": DDPConfig, "ddp_spawn": DDPConfig, "fsdp": FSDPConfig},
    "logger": {"wandb": WandbLoggerConfig, "csv": CsvLoggerConfig, "none": NoLoggerConfig},
}

PRECISION_FLAGS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
MATMUL_PRECISIONS = ("highest", "high", "medium")
WANDB_MODES = ("offline", "online", "disabled")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PROCESS_GROUP_BACKENDS = ("nccl", "gloo")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")
REDUCE_DTYPES = ("float32", "bfloat16")
STATE_DICT_TYPES = ("sharded", "full")
PROFILER_SORT_KEYS = (  # columns torch.profiler's key_averages().table(sort_by=...) sorts by
    "self_cpu_time_total", "cpu_time_total", "self_cuda_time_total", "cuda_time_total",
    "self_cpu_memory_usage", "cpu_memory_usage", "self_cuda_memory_usage", "cuda_memory_usage", "count",
)  # fmt: skip


@dataclass(frozen=True)
class RunPlan:
    """Quantities derived from the config: how the token budget becomes optimizer steps."""

    world_size: int
    grad_accum: int  # micro-steps per optimizer step
    total_steps: int
    tokens_per_step: int

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step


def load_config(cfg: DictConfig | dict) -> tuple[TrainConfig, RunPlan]:
    """Type-check and validate a composed config; raise ConfigError naming the first bad key."""
    raw = _resolve(cfg)
    groups = {key: _typed_group(key, raw.pop(key, None)) for key in SCHEMAS}
    groups["model"] = _typed(GPTConfig, raw.pop("model", {}), "model")
    top = _typed(TrainConfig, raw, "")
    train_cfg = dataclasses.replace(top, **groups)
    plan = _plan(train_cfg)
    _check_values(train_cfg, plan)
    return train_cfg, plan


def _resolve(cfg: DictConfig | dict) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(e.full_key or "<config>", _first_line(e)) from None


def _typed_group(key: str, node: Any):
    if not isinstance(node, dict):
        raise ConfigError(key, f"missing config group; pick one of: {', '.join(SCHEMAS[key])}")
    options = SCHEMAS[key]
    name = node.get("name")
    if name not in options:
        raise ConfigError(f"{key}.name", f"unknown option {name!r}; choose one of: {', '.join(options)}")
    return _typed(options[name], node, key)


def _typed(schema: type, node: dict, prefix: str):
    """Merge `node` into the dataclass `schema`: wrong types and unknown keys raise ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        raise ConfigError(_join(prefix, e.full_key), "is required but has no value") from None
    except OmegaConfBaseException as e:
        key = _join(prefix, e.full_key or str(e.key or ""))
        if "not in" in str(e):  # ConfigKeyError / ConfigAttributeError for an unknown key
            allowed = ", ".join(f.name for f in dataclasses.fields(schema))
            raise ConfigError(key, f"unknown key; allowed here: {allowed}") from None
        raise ConfigError(key, _first_line(e)) from None


def _plan(cfg: TrainConfig) -> RunPlan:
    world = cfg.trainer.devices * cfg.distributed.num_nodes
    _require(world >= 1, "trainer.devices", f"must be >= 1 (got {cfg.trainer.devices})")
    _require(cfg.distributed.num_nodes >= 1, "distributed.num_nodes", "must be >= 1")
    per_micro_step = cfg.data.micro_batch_size * cfg.data.seq_len * world
    _require(cfg.data.micro_batch_size >= 1, "data.micro_batch_size", "must be >= 1")
    _require(cfg.data.seq_len >= 1, "data.seq_len", "must be >= 1")
    _require(
        cfg.global_batch_tokens > 0 and cfg.global_batch_tokens % per_micro_step == 0,
        "global_batch_tokens",
        f"must be a positive multiple of data.micro_batch_size x data.seq_len x devices "
        f"= {cfg.data.micro_batch_size} x {cfg.data.seq_len} x {world} = {per_micro_step} "
        f"(got {cfg.global_batch_tokens})",
    )
    if cfg.max_tokens is not None:
        _require(
            cfg.max_tokens >= cfg.global_batch_tokens,
            "max_tokens",
            f"must be at least one step of global_batch_tokens={cfg.global_batch_tokens} (got {cfg.max_tokens})",
        )
        total_steps = cfg.max_tokens // cfg.global_batch_tokens
    else:
        _require(cfg.trainer.max_steps >= 1, "trainer.max_steps", "must be >= 1 when max_tokens is null")
        total_steps = cfg.trainer.max_steps
    return RunPlan(world, cfg.global_batch_tokens // per_micro_step, total_steps, cfg.global_batch_tokens)


def _check_values(cfg: TrainConfig, plan: RunPlan) -> None:
    _check_model(cfg.model, cfg.data)
    _check_data(cfg.data)
    _require(cfg.seed >= 0, "seed", f"must be >= 0 (got {cfg.seed})")
    _check_optimizer(cfg.optimizer)
    _require(cfg.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables clipping; got {cfg.grad_clip})")
    _check_scheduler(cfg.scheduler, plan)
    _check_precision(cfg.precision)
    _check_choice("trainer.accelerator", cfg.trainer.accelerator, ACCELERATORS)
    _check_distributed(cfg, plan)
    if isinstance(cfg.logger, WandbLoggerConfig):
        _check_choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    _check_trainer(cfg.trainer)
    _check_eval(cfg.eval)
    _check_callbacks(cfg.callbacks)


def _check_model(m: GPTConfig, data: "DataConfig") -> None:
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1 (got {getattr(m, key)})")
    _require(
        m.n_embd % m.n_head == 0,
        "model.n_embd",
        f"must be divisible by model.n_head (got n_embd={m.n_embd}, n_head={m.n_head})",
    )
    _require(m.vocab_size >= GPT2_VOCAB, "model.vocab_size", f"must be >= {GPT2_VOCAB}, the GPT-2 vocabulary")
    _check_choice("model.norm_position", m.norm_position, NORM_POSITIONS)
    _check_choice("model.norm", m.norm, NORMS)
    _check_choice("model.init", m.init, INITS)
    _check_choice("model.attention", m.attention, ATTENTIONS)
    _require(m.init_std > 0, "model.init_std", f"must be > 0 (got {m.init_std})")
    for key in ("embd_dropout", "attn_dropout", "resid_dropout", "label_smoothing"):
        _require(0.0 <= getattr(m, key) < 1.0, f"model.{key}", f"must be in [0, 1) (got {getattr(m, key)})")
    _require(
        data.seq_len <= m.block_size,
        "data.seq_len",
        f"must be <= model.block_size={m.block_size} (got {data.seq_len})",
    )


def _check_optimizer(opt: OptimizerConfig | MuonAdamWConfig, key: str = "optimizer") -> None:
    """The knobs every option shares where it has them, then each option's own."""
    _require(opt.lr > 0, f"{key}.lr", f"must be > 0 (got {opt.lr})")
    _require(opt.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0 (got {opt.weight_decay})")
    if hasattr(opt, "betas"):
        _require(
            len(opt.betas) == 2 and all(0.0 <= b < 1.0 for b in opt.betas),
            f"{key}.betas",
            f"must be two numbers in [0, 1), e.g. [0.9, 0.95] (got {opt.betas})",
        )
    if hasattr(opt, "eps"):
        _require(opt.eps > 0, f"{key}.eps", f"must be > 0 (got {opt.eps})")
    if hasattr(opt, "momentum"):
        _require(opt.momentum >= 0, f"{key}.momentum", f"must be >= 0 (got {opt.momentum})")
    if isinstance(opt, SGDConfig):
        _require(0.0 <= opt.dampening <= 1.0, f"{key}.dampening", f"must be in [0, 1] (got {opt.dampening})")
        _require(
            not opt.nesterov or (opt.momentum > 0 and opt.dampening == 0),
            f"{key}.nesterov",
            f"needs momentum > 0 and dampening 0 (got momentum={opt.momentum}, dampening={opt.dampening})",
        )
    elif isinstance(opt, RMSpropConfig):
        _require(0.0 <= opt.alpha < 1.0, f"{key}.alpha", f"must be in [0, 1) (got {opt.alpha})")
    elif isinstance(opt, AdagradConfig):
        _require(opt.lr_decay >= 0, f"{key}.lr_decay", f"must be >= 0 (got {opt.lr_decay})")
        _require(opt.initial_accumulator_value >= 0, f"{key}.initial_accumulator_value", "must be >= 0")
    elif isinstance(opt, MuonConfig):
        _require(opt.momentum < 1, f"{key}.momentum", f"must be in [0, 1) (got {opt.momentum})")
        _require(len(opt.ns_coefficients) == 3, f"{key}.ns_coefficients", "must be three numbers [a, b, c]")
        _require(1 <= opt.ns_steps < 100, f"{key}.ns_steps", f"must be in [1, 100) (got {opt.ns_steps})")
        _require(
            opt.adjust_lr_fn in (None, "original", "match_rms_adamw"),
            f"{key}.adjust_lr_fn",
            f"unknown option {opt.adjust_lr_fn!r}; choose one of: null, original, match_rms_adamw",
        )
        _check_optimizer(opt.adamw, f"{key}.adamw")


def _check_scheduler(sched: SchedulerConfig, plan: RunPlan) -> None:
    total, warmup = plan.total_steps, sched.warmup_steps
    _require(warmup >= 0, "scheduler.warmup_steps", f"must be >= 0 (got {warmup})")
    _require(warmup <= total, "scheduler.warmup_steps", f"is longer than the run: {warmup} > {total} optimizer steps")
    if hasattr(sched, "min_lr_ratio"):
        ratio = sched.min_lr_ratio
        _require(0.0 <= ratio <= 1.0, "scheduler.min_lr_ratio", f"must be in [0, 1] (got {ratio})")
    if hasattr(sched, "gamma"):
        _require(0.0 < sched.gamma <= 1.0, "scheduler.gamma", f"must be in (0, 1] (got {sched.gamma})")
    if isinstance(sched, WSDConfig):
        fraction = sched.decay_fraction
        _require(0.0 < fraction <= 1.0, "scheduler.decay_fraction", f"must be in (0, 1] (got {fraction})")
        _check_choice("scheduler.decay_shape", sched.decay_shape, WSD_SHAPES)
        decay = sched.decay_steps(total)
        _require(
            warmup + decay <= total,
            "scheduler.decay_fraction",
            f"{fraction} of the run is {decay} decay steps, which overlap the {warmup} warmup steps "
            f"(together more than the run's {total} steps)",
        )
    elif isinstance(sched, InverseSqrtConfig):
        d_model = sched.d_model
        _require(d_model is None or d_model >= 1, "scheduler.d_model", f"must be null or >= 1 (got {d_model})")
    elif isinstance(sched, StepConfig):
        _require(sched.step_size >= 1, "scheduler.step_size", f"must be >= 1 (got {sched.step_size})")
    elif isinstance(sched, CosineRestartsConfig):
        _require(sched.T_0 >= 1, "scheduler.T_0", f"must be >= 1 (got {sched.T_0})")
        _require(sched.T_mult >= 1, "scheduler.T_mult", f"must be an integer >= 1 (got {sched.T_mult})")


def _check_precision(precision: PrecisionConfig) -> None:
    _check_choice("precision.trainer_precision", precision.trainer_precision, PRECISION_FLAGS)
    _check_choice("precision.matmul_precision", precision.matmul_precision, MATMUL_PRECISIONS)


def _check_distributed(cfg: TrainConfig, plan: RunPlan) -> None:
    d = cfg.distributed
    _require(
        d.name != "single" or plan.world_size == 1,
        "trainer.devices",
        f"distributed=single runs one process on one device (got {plan.world_size} devices); "
        "pick distributed=ddp or distributed=fsdp for more",
    )
    if d.name == "single":
        return
    _require(d.process_group_backend in (None, *PROCESS_GROUP_BACKENDS), "distributed.process_group_backend",
             f"must be null, nccl or gloo (got {d.process_group_backend!r})")  # fmt: skip
    _require(d.timeout_min > 0, "distributed.timeout_min", f"must be > 0 (got {d.timeout_min})")
    if isinstance(d, DDPConfig):
        _require(d.bucket_cap_mb > 0, "distributed.bucket_cap_mb", f"must be > 0 (got {d.bucket_cap_mb})")
        return
    _check_choice("distributed.sharding_strategy", d.sharding_strategy, SHARDING_STRATEGIES)
    _check_choice("distributed.reduce_dtype", d.reduce_dtype, REDUCE_DTYPES)
    _check_choice("distributed.state_dict_type", d.state_dict_type, STATE_DICT_TYPES)
    _require(
        cfg.precision.trainer_precision != "16-mixed",
        "precision",
        "distributed=fsdp runs fp32, tf32, bf16 or bf16_true; fp16 needs a sharded gradient scaler, which "
        "Lightning's ModelParallelStrategy does not have (use precision=bf16)",
    )


def _check_eval(ev: EvalConfig) -> None:
    _require(ev.every_n_steps >= 1, "eval.every_n_steps", "must be >= 1")
    _require(ev.val_tokens >= 1, "eval.val_tokens", "must be >= 1")
    h = ev.hellaswag
    _check_choice("eval.hellaswag.if_missing", h.if_missing, ("warn", "fail"))
    _require(h.every_n_steps >= 0, "eval.hellaswag.every_n_steps", "must be >= 0 (0: only at the end)")
    _require(h.limit is None or h.limit >= 1, "eval.hellaswag.limit", "must be null or >= 1")
    _require(h.batch_size >= 1, "eval.hellaswag.batch_size", "must be >= 1")


def _check_trainer(t: TrainerConfig) -> None:
    _require(t.log_every_n_steps >= 1, "trainer.log_every_n_steps", "must be >= 1")
    _require(
        t.stopping_threshold is None or t.stopping_threshold > 0,
        "trainer.stopping_threshold",
        f"must be null or > 0, a cross-entropy loss never falls below 0 (got {t.stopping_threshold})",
    )


def _check_callbacks(cb: CallbacksConfig) -> None:
    _require(cb.checkpoint.every_n_steps >= 1, "callbacks.checkpoint.every_n_steps", "must be >= 1")
    _require(cb.checkpoint.save_top_k >= -1, "callbacks.checkpoint.save_top_k", "must be >= -1 (-1 keeps all)")
    _require(cb.progress_bar_refresh_rate >= 0, "callbacks.progress_bar_refresh_rate", "must be >= 0")
    _check_profiler(cb.profiler)
    _check_monitor(cb.monitor)


def _check_profiler(p: ProfilerConfig) -> None:
    for key in ("wait", "warmup", "row_limit"):
        _require(getattr(p, key) >= 0, f"callbacks.profiler.{key}", f"must be >= 0 (got {getattr(p, key)})")
    _require(p.active >= 1, "callbacks.profiler.active", f"must be >= 1 (got {p.active})")
    _check_choice("callbacks.profiler.sort_by", p.sort_by, PROFILER_SORT_KEYS)


def _check_monitor(m: MonitorConfig) -> None:
    _require(m.every_n_steps >= 1, "callbacks.monitor.every_n_steps", f"must be >= 1 (got {m.every_n_steps})")
    _check_choice("callbacks.monitor.on_nan", m.on_nan, ("stop", "skip"))
    s = m.loss_spike
    _require(s.window >= 2, "callbacks.monitor.loss_spike.window", f"must be >= 2 (got {s.window})")
    _require(s.k > 0, "callbacks.monitor.loss_spike.k", f"must be > 0 (got {s.k})")
    _require(
        2 <= s.min_steps <= s.window,
        "callbacks.monitor.loss_spike.min_steps",
        f"must be in [2, loss_spike.window={s.window}] (got {s.min_steps})",
    )


def load_data_config(cfg: DictConfig | dict) -> DataConfig:
    """The typed `data` group alone, checked as training checks it (for scripts/prepare_data.py)."""
    data = _typed_group("data", _resolve(cfg).get("data"))
    _check_data(data)
    return data


def _check_data(d: DataConfig) -> None:
    _require(
        d.val_source is not None or 0.0 < d.val_fraction < 1.0,
        "data.val_fraction",
        f"must be in (0, 1) when data.val_source is null (got {d.val_fraction})",
    )
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.shuffle_seed is None or d.shuffle_seed >= 0, "data.shuffle_seed", "must be null or >= 0")
    _require(d.overfit_batches >= 0, "data.overfit_batches", f"must be >= 0 (0: off; got {d.overfit_batches})")
    _check_prepare(d.prepare)


def _check_prepare(p: PrepareConfig) -> None:
    _require(p.workers >= 1, "data.prepare.workers", f"must be >= 1 (got {p.workers})")
    _require(p.shard_tokens >= 1, "data.prepare.shard_tokens", "must be >= 1")
    for key in ("max_docs", "max_tokens"):
        value = getattr(p, key)
        _require(value is None or value >= 1, f"data.prepare.{key}", f"must be null or >= 1 (got {value})")
    for i, f in enumerate(p.filters):
        _require(
            f.min is not None or f.max is not None or f.one_of is not None,
            f"data.prepare.filters[{i}]",
            f"filter on {f.field!r} needs min, max or one_of",
        )


CHECKPOINTS_DIR = "checkpoints"  # in a run folder: last.ckpt and the periodic step_XXXXXX.ckpt
LAST_CHECKPOINT = "last.ckpt"  # always the newest checkpoint of the run
SHARDED_META = "meta.pt"  # in a sharded checkpoint folder: all but the model and optimizer shards (Lightning's name)


def check_paths(cfg: TrainConfig) -> TrainConfig:
    """Checks that depend on this machine's files, kept apart so that checkpoints reload anywhere.
    Returns cfg with ckpt_path resolved to a checkpoint file (or sharded checkpoint folder)."""
    if cfg.ckpt_path is None:
        return cfg
    resolved = resolve_ckpt_path(cfg.ckpt_path, sharded_ok=cfg.distributed.name == "fsdp")
    return dataclasses.replace(cfg, ckpt_path=resolved)


def resolve_ckpt_path(path: str, sharded_ok: bool = True) -> str:
    """A checkpoint (a .ckpt file or a sharded checkpoint folder), or a run folder meaning its
    checkpoints/last.ckpt (either kind). Resuming must never silently start from scratch (Lightning does so
    for ckpt_path="last"), so anything else is an error. sharded_ok=False: this run cannot load a sharded one."""
    if os.path.isdir(path) and not is_sharded_checkpoint(path):
        last = os.path.join(path, CHECKPOINTS_DIR, LAST_CHECKPOINT)
        _require(
            os.path.isfile(last) or is_sharded_checkpoint(last),
            "ckpt_path",
            f"the folder {path} has no {CHECKPOINTS_DIR}/{LAST_CHECKPOINT} to resume from "
            "(give a run folder, a .ckpt file or a sharded checkpoint folder)",
        )
        path = last
    _require(
        os.path.isfile(path) or is_sharded_checkpoint(path),
        "ckpt_path",
        f"no checkpoint file, sharded checkpoint folder or run folder at {path}",
    )
    _require(
        sharded_ok or not is_sharded_checkpoint(path),
        "ckpt_path",
        f"{path} is a sharded checkpoint (a folder written by distributed=fsdp): resume it with distributed=fsdp "
        "on as many devices, or load its weights with gptlab.checkpoint.load_gpt",
    )
    return path


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder of checkpoint shards, as distributed=fsdp writes with state_dict_type=sharded (Lightning's test)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_META))


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"unknown option {value!r}; choose one of: {', '.join(allowed)}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _join(prefix: str, key: Any) -> str:
    return ".".join(part for part in (prefix, str(key)) if part)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
