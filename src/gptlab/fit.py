"""Build the data, model, loggers and Lightning Trainer for a validated config, and fit."""

import platform
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_only

from gptlab.callbacks.checkpoints import AtomicCheckpointIO, StepCheckpoints
from gptlab.callbacks.harness import HarnessEval, describe
from gptlab.callbacks.hellaswag import HellaSwagEval, coverage
from gptlab.callbacks.mixture import MixtureRepeats
from gptlab.callbacks.monitor import TrainingMonitor
from gptlab.callbacks.preemption import Preemption
from gptlab.callbacks.profiler import TorchProfiler
from gptlab.callbacks.progress import StepProgressBar
from gptlab.callbacks.random_state import RandomState
from gptlab.callbacks.step_log import StepLog
from gptlab.callbacks.stopping import StoppingThreshold
from gptlab.callbacks.summary import RunSummary
from gptlab.callbacks.throughput import ThroughputMeter
from gptlab.config import CHECKPOINTS_DIR, RunPlan, TrainConfig
from gptlab.console import quiet_console, say
from gptlab.data.config import DataConfig, data_sources
from gptlab.data.datamodule import TokenDataModule
from gptlab.distributed import build_strategy
from gptlab.flops import flops_per_token, precision_kind
from gptlab.loggers import build_loggers
from gptlab.module import GPTModule
from gptlab.provenance import write_provenance
from gptlab.resume import Resume
from gptlab.sweep import hydra_choices, hydra_overrides


def fit(cfg: TrainConfig, plan: RunPlan, run_dir: Path, started: float, resume: Resume) -> None:
    """Train, or, resumed from a checkpoint with no steps left, validate it; summary.json (rank 0) says what came
    of it. cfg has passed gptlab.config.load_config, and cfg.ckpt_path is resume.path (gptlab.resume.find_resume);
    started: time.time() when the job began."""
    quiet_console()  # gptlab's lines on the console and in train.log; third-party chatter in train.log only
    write_provenance(run_dir)  # rank 0: command line, git commit and diff, package versions
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # 0 is a valid seed
    torch.set_float32_matmul_precision(cfg.precision.matmul_precision)
    module = GPTModule(cfg, plan)
    datamodule = TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed)
    callbacks = build_callbacks(cfg, plan, run_dir)
    sample = (cfg.eval.sample_prompt, cfg.eval.sample_tokens)
    callbacks.append(RunSummary(run_dir, started, cfg.seed, plan.tokens_per_step, sample))
    overrides, choices = hydra_overrides(), hydra_choices()
    loggers = build_loggers(cfg, run_dir, run_name=",".join(overrides) or run_dir.name)
    for logger in loggers:
        logger.log_hyperparams({**asdict(cfg), "overrides": overrides, "choices": choices, "plan": asdict(plan)})
    trainer = build_trainer(cfg, plan, run_dir, loggers, callbacks)
    _print_header(cfg, plan, module, trainer, run_dir, choices, resume)
    if cfg.ckpt_path is not None and resume.step >= plan.total_steps:
        trainer.validate(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False)
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)


def build_callbacks(cfg: TrainConfig, plan: RunPlan, run_dir: Path) -> list[L.Callback]:
    """The run's callbacks; those the config switches off are left out. The step itself needs none of them."""
    h, profiler = cfg.eval.hellaswag, cfg.callbacks.profiler
    preemption = Preemption(cfg.trainer.requeue)
    callbacks = [
        ThroughputMeter(
            plan.tokens_per_step, cfg.trainer.log_every_n_steps, cfg.data.seq_len,
            flops_per_token(cfg.model, cfg.data.seq_len),
            precision_kind(cfg.precision.trainer_precision, cfg.precision.matmul_precision),
        ),  # fmt: skip
        TrainingMonitor(cfg.callbacks.monitor, cfg.on_nan),
        preemption,  # SIGTERM/SIGUSR1: stop at the step's end, checkpointed
        StepCheckpoints(run_dir / CHECKPOINTS_DIR, cfg.callbacks.checkpoint.every_n_steps,
                        cfg.callbacks.checkpoint.save_top_k, preemption),  # fmt: skip
        RandomState(),  # RNG states in checkpoints; evaluation leaves the training stream alone
        MixtureRepeats() if cfg.data.mixture else None,
        HellaSwagEval(h, cfg.precision.trainer_precision) if h.enabled else None,
        HarnessEval(cfg.eval.harness, cfg.precision.trainer_precision) if cfg.eval.harness.tasks else None,
        StoppingThreshold(cfg.trainer.stopping_threshold) if cfg.trainer.stopping_threshold is not None else None,
        TorchProfiler(profiler, run_dir / "profile") if profiler.enabled else None,
        StepLog(cfg.trainer.log_every_n_steps),  # after those that measure the step
    ]
    if cfg.callbacks.progress_bar_refresh_rate > 0:
        callbacks.append(StepProgressBar(plan.total_steps, cfg.callbacks.progress_bar_refresh_rate))
    return [c for c in callbacks if c is not None]


def build_trainer(cfg: TrainConfig, plan: RunPlan, run_dir: Path, loggers: list, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.distributed.num_nodes,
        strategy=build_strategy(cfg),
        **_with_checkpoint_io(_precision_args(cfg)),
        max_steps=plan.total_steps,
        accumulate_grad_batches=plan.grad_accum,
        val_check_interval=cfg.eval.every_n_steps * plan.grad_accum,  # counted in micro-batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1 if cfg.eval.at_start else 0,  # -1: the whole validation set at step 0
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=cfg.callbacks.progress_bar_refresh_rate > 0,
        enable_model_summary=False,  # the header says it in one line
        use_distributed_sampler=False,  # the datamodule gives each rank its own batches
        deterministic=cfg.trainer.deterministic,
        detect_anomaly=cfg.trainer.detect_anomaly,
        default_root_dir=str(run_dir),
    )


def _with_checkpoint_io(trainer_args: dict) -> dict:
    """Add the atomic checkpoint writer to the Trainer's plugins (fp16 on CPU passes its precision there)."""
    return {**trainer_args, "plugins": [*trainer_args.get("plugins", []), AtomicCheckpointIO()]}


def _precision_args(cfg: TrainConfig) -> dict:
    """Trainer precision arguments. Lightning turns fp16 on CPU into bf16 behind a warning; gptlab instead
    runs real fp16 autocast with a CPU GradScaler there, so fp16 means fp16 on every device."""
    flag = cfg.precision.trainer_precision
    accelerator = cfg.trainer.accelerator
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if flag == "16-mixed" and on_cpu:
        return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    return {"precision": flag}


def _architecture(m) -> str:
    """The architecture choices in a few words, e.g. `pre-layernorm, sdpa attention, gpt2 init, tied embeddings`."""
    parts = [f"{m.norm_position}-{m.norm}", f"{m.attention} attention", f"{m.init} init"]
    parts.append("tied embeddings" if m.tie_embeddings else "untied head")
    parts += [] if m.bias else ["no bias"]
    dropouts = {"embd": m.embd_dropout, "attn": m.attn_dropout, "resid": m.resid_dropout}
    parts += [f"{k} dropout {v:g}" for k, v in dropouts.items() if v > 0]
    parts += [f"label smoothing {m.label_smoothing:g}"] if m.label_smoothing > 0 else []
    parts += ["activation checkpointing"] if m.activation_checkpointing else []
    parts += ["compiled"] if m.compile else []
    return ", ".join(parts)


def _warmup(scheduler, total_steps: int) -> str:
    """The warmup's steps, and scheduler.warmup_steps where the run's length capped it."""
    steps, asked = scheduler.warmup(total_steps), scheduler.warmup_steps
    return f"{steps}" if steps == asked else f"{steps}: scheduler.warmup_steps={asked} capped to fit the run"


def _depth(m) -> str:
    """How the sizes were set, where the depth dial set them."""
    return "" if m.depth is None else f" (depth {m.depth}, aspect ratio {m.aspect_ratio}, head_dim {m.head_dim})"


def _parallelism(cfg: TrainConfig) -> str:
    d = cfg.distributed
    nodes = f" on {d.num_nodes} nodes" if d.num_nodes > 1 else ""
    if d.name == "fsdp":
        return f"fsdp {d.sharding_strategy}, {d.state_dict_type} checkpoints{nodes}"
    return f"{d.name}{nodes}"


def _evaluations(cfg: TrainConfig, device_type: str) -> str:
    """What is evaluated besides the validation loss, and on how much, e.g. `HellaSwag: the first 200 examples
    (eval.hellaswag.cpu_limit, on CPU), after the last step`, then the lm-eval tasks (eval.harness), if any."""
    h, harness = cfg.eval.hellaswag, describe(cfg.eval.harness, device_type)
    if not h.enabled:
        return "HellaSwag off (eval.hellaswag.enabled=false)" + harness
    return f"HellaSwag: {coverage(h, 'eval.hellaswag', device_type)}, prompt {h.prompt}" + harness


def _data(d: DataConfig) -> str:
    """The data row's start: the dataset, or the mixture's sources and weights."""
    if not d.mixture:
        return f"{d.name} ({d.dir}), {'documents shuffled each epoch' if d.shuffle else 'read in order'}"
    sources = ", ".join(f"{s.name} {s.weight:.3f} ({s.folder})" for s in data_sources(d))
    return f"mixture of {sources}, sequences drawn by weight"


@rank_zero_only
def _print_header(cfg: TrainConfig, plan: RunPlan, module: GPTModule, trainer, run_dir: Path, choices,
                  resume: Resume) -> None:
    d = cfg.data
    model_name = choices.get("model", "model")
    rows = [
        f"model      {model_name}: {module.model.num_params() / 1e6:.2f}M parameters "
        f"({module.model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings), "
        f"{cfg.model.n_layer} layers, {cfg.model.n_head} heads, d={cfg.model.n_embd}, vocab {cfg.model.vocab_size}"
        f"{_depth(cfg.model)}",
        f"           {_architecture(cfg.model)}",
        f"batch      {plan.tokens_per_step:,} tokens/step = micro-batch {d.micro_batch_size} x seq {d.seq_len} "
        f"x {plan.world_size} device(s) x {plan.grad_accum} accumulation step(s)",
        "           global_batch_tokens fixes the optimization: more devices or a larger micro-batch mean fewer "
        "accumulation steps, the same updates",
        f"budget     {plan.total_steps:,} steps = {plan.total_tokens:,} tokens, set by {plan.budget}; "
        f"lr {cfg.optimizer.lr:g} ({choices.get('optimizer', cfg.optimizer.name)}, "
        f"{choices.get('scheduler', cfg.scheduler.name)}, warmup {_warmup(cfg.scheduler, plan.total_steps)})",
        f"hardware   {trainer.accelerator.__class__.__name__.replace('Accelerator', '').lower()} x "
        f"{plan.world_size} ({_parallelism(cfg)}), precision {cfg.precision.name} ({cfg.precision.trainer_precision}), "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"data       {_data(d)}; validation {cfg.eval.val_tokens:,} tokens{' per source' if d.mixture else ''} "
        f"every {cfg.eval.every_n_steps} steps",
        f"eval       {_evaluations(cfg, trainer.strategy.root_device.type)}",
        f"run folder {run_dir}",
        *([f"resume     {resume.note}"] if resume.note else []),
    ]
    say("\n".join(["gptlab", *(f"  {r}" for r in rows)]))


