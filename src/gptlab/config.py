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

from gptlab.errors import UserInputError
from gptlab.model import GPTConfig

GPT2_VOCAB = 50257  # ids the GPT-2 tokenizer can produce; the model's vocab_size must cover them


class ConfigError(UserInputError, ValueError):
    """A user mistake in the config: `key` is the dotted path of the offending value."""

    label = "Config error"

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass
class AdamWConfig:
    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled (Loshchilov & Hutter), on >=2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    decay_embeddings: bool = True  # also decay the (tied) token and position embeddings


@dataclass
class CosineConfig:
    name: str = "cosine"
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the LR decays to min_lr = min_lr_ratio * optimizer.lr


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
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class SingleDeviceConfig:
    name: str = "single"
    strategy: str = "auto"  # Lightning strategy flag
    num_nodes: int = 1


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


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500  # periodic checkpoints; last.ckpt is also written at the end
    save_top_k: int = -1  # how many periodic checkpoints to keep (-1: all)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
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
    ckpt_path: Optional[str] = None  # a checkpoint to resume this run from
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
    "optimizer": {"adamw": AdamWConfig},
    "scheduler": {"cosine": CosineConfig},
    "precision": {name: PrecisionConfig for name in ("fp32", "tf32", "bf16", "fp16")},
    "data": {name: DataConfig for name in ("sample", "fineweb_edu", "fineweb", "slimpajama", "local")},
    "distributed": {"single": SingleDeviceConfig},
    "logger": {"wandb": WandbLoggerConfig, "csv": CsvLoggerConfig, "none": NoLoggerConfig},
}

PRECISION_FLAGS = ("32-true", "bf16-mixed", "16-mixed")
MATMUL_PRECISIONS = ("highest", "high", "medium")
WANDB_MODES = ("offline", "online", "disabled")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


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
    _require(
        cfg.distributed.name != "single" or plan.world_size == 1,
        "trainer.devices",
        f"distributed=single runs one process on one device (got {plan.world_size} devices)",
    )
    if isinstance(cfg.logger, WandbLoggerConfig):
        _check_choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    _require(cfg.trainer.log_every_n_steps >= 1, "trainer.log_every_n_steps", "must be >= 1")
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
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1) (got {m.dropout})")
    _require(
        data.seq_len <= m.block_size,
        "data.seq_len",
        f"must be <= model.block_size={m.block_size} (got {data.seq_len})",
    )


def _check_optimizer(opt) -> None:
    _require(opt.lr > 0, "optimizer.lr", f"must be > 0 (got {opt.lr})")
    _require(opt.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0 (got {opt.weight_decay})")
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(opt, key) < 1.0, f"optimizer.{key}", "must be in [0, 1)")
    _require(opt.eps > 0, "optimizer.eps", "must be > 0")


def _check_scheduler(sched, plan: RunPlan) -> None:
    _require(sched.warmup_steps >= 0, "scheduler.warmup_steps", "must be >= 0")
    _require(
        sched.warmup_steps <= plan.total_steps,
        "scheduler.warmup_steps",
        f"is longer than the run: {sched.warmup_steps} > {plan.total_steps} optimizer steps",
    )
    _require(0.0 <= sched.min_lr_ratio <= 1.0, "scheduler.min_lr_ratio", "must be in [0, 1]")


def _check_precision(precision: PrecisionConfig) -> None:
    _check_choice("precision.trainer_precision", precision.trainer_precision, PRECISION_FLAGS)
    _check_choice("precision.matmul_precision", precision.matmul_precision, MATMUL_PRECISIONS)


def _check_eval(ev: EvalConfig) -> None:
    _require(ev.every_n_steps >= 1, "eval.every_n_steps", "must be >= 1")
    _require(ev.val_tokens >= 1, "eval.val_tokens", "must be >= 1")
    h = ev.hellaswag
    _check_choice("eval.hellaswag.if_missing", h.if_missing, ("warn", "fail"))
    _require(h.every_n_steps >= 0, "eval.hellaswag.every_n_steps", "must be >= 0 (0: only at the end)")
    _require(h.limit is None or h.limit >= 1, "eval.hellaswag.limit", "must be null or >= 1")
    _require(h.batch_size >= 1, "eval.hellaswag.batch_size", "must be >= 1")


def _check_callbacks(cb: CallbacksConfig) -> None:
    _require(cb.checkpoint.every_n_steps >= 1, "callbacks.checkpoint.every_n_steps", "must be >= 1")
    _require(cb.progress_bar_refresh_rate >= 0, "callbacks.progress_bar_refresh_rate", "must be >= 0")


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


def check_paths(cfg: TrainConfig) -> None:
    """Checks that depend on this machine's files, kept apart so that checkpoints reload anywhere."""
    if cfg.ckpt_path is not None:
        # Resuming must never silently start from scratch (Lightning does so for ckpt_path="last").
        _require(os.path.isfile(cfg.ckpt_path), "ckpt_path", f"no checkpoint file at {cfg.ckpt_path}")


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"unknown option {value!r}; choose one of: {', '.join(allowed)}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _join(prefix: str, key: Any) -> str:
    return ".".join(part for part in (prefix, str(key)) if part)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
