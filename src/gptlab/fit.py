"""Build the data, model, loggers and Lightning Trainer for a validated config, and fit."""

import platform
from dataclasses import asdict
from pathlib import Path

import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_only

from gptlab.callbacks.hellaswag import HellaSwagEval
from gptlab.callbacks.monitor import TrainingMonitor
from gptlab.callbacks.profiler import TorchProfiler
from gptlab.callbacks.results import RunResults, read_results
from gptlab.callbacks.stopping import StoppingThreshold
from gptlab.callbacks.throughput import ThroughputMonitor
from gptlab.config import CHECKPOINTS_DIR, RunPlan, TrainConfig
from gptlab.data.datamodule import TokenDataModule
from gptlab.distributed import build_strategy
from gptlab.flops import flops_per_token, precision_kind
from gptlab.launch import external_launcher, spawned_rank_errors
from gptlab.loggers import build_loggers
from gptlab.module import GPTModule
from gptlab.provenance import write_provenance
from gptlab.resume import AtomicCheckpointIO, RandomState, RunCheckpoint
from gptlab.sweep import hydra_choices, hydra_overrides, in_multirun

# Lightning 2.6 on torch 2.13 warns on every run about an internal use of a deprecated torch API.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
# Under DDP, Lightning suggests sync_dist for epoch-level logs: val/loss is reduced over ranks already, and
# "step" is the same on every rank.
warnings.filterwarnings("ignore", message=r".*It is recommended to use `self.log\('(val/loss|step)'")

SUMMARY_RESULTS = (
    "train_loss", "val_loss", "val_loss_initial", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_n", "tokens_per_s",
    "samples_per_s", "step_time_ms", "mfu",
)  # fmt: skip

# Resuming mid-epoch, Lightning warns that the loader is not resumable: TokenDataModule restores its position.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable")


def fit(cfg: TrainConfig, plan: RunPlan, run_dir: Path) -> dict:
    """Train; return the summary fields (losses, steps, throughput). cfg has passed gptlab.config.load_config."""
    write_provenance(run_dir)  # rank 0: command line, git commit and diff, package versions
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # 0 is a valid seed
    torch.set_float32_matmul_precision(cfg.precision.matmul_precision)
    module = GPTModule(cfg, plan)
    datamodule = TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed)
    callbacks = _build_callbacks(cfg, plan, run_dir)
    throughput, hellaswag = callbacks[ThroughputMonitor], callbacks[HellaSwagEval]
    overrides, choices = hydra_overrides(), hydra_choices()
    loggers = build_loggers(cfg, run_dir, run_name=",".join(overrides) or run_dir.name)
    for logger in loggers:
        logger.log_hyperparams({**asdict(cfg), "overrides": overrides, "choices": choices, "plan": asdict(plan)})
    callbacks[RunResults] = RunResults(throughput, hellaswag)  # last: it reads what the others measured
    trainer = _build_trainer(cfg, plan, run_dir, loggers, [c for c in callbacks.values() if c is not None])
    _print_header(cfg, plan, module, trainer, run_dir, choices)

    with spawned_rank_errors():  # a spawned rank's diverged run is reported as diverged, not as a traceback
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        results = read_results(trainer)
        if results.get("val_step") != results.get("step"):  # no steps left to train (RunResults validates the last)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            results["val_loss"] = read_results(trainer).get("val_loss")
    step = int(results.get("step", 0))
    summary = {key: results.get(key) for key in SUMMARY_RESULTS}
    hellaswag_n = summary["hellaswag_n"]
    return summary | {
        "step": step,
        "tokens": step * plan.tokens_per_step,
        "hellaswag_n": None if hellaswag_n is None else int(hellaswag_n),
        "params": module.model.num_params(),
        "run_dir": str(run_dir),
    }


def _build_callbacks(cfg: TrainConfig, plan: RunPlan, run_dir: Path) -> dict[type, L.Callback | None]:
    """The run's callbacks by class; None where the config switches one off."""
    h = cfg.eval.hellaswag
    stop_below, profiler = cfg.trainer.stopping_threshold, cfg.callbacks.profiler
    return {
        ThroughputMonitor: ThroughputMonitor(
            plan.tokens_per_step, cfg.trainer.log_every_n_steps, cfg.data.seq_len,
            flops_per_token(cfg.model, cfg.data.seq_len),
            precision_kind(cfg.precision.trainer_precision, cfg.precision.matmul_precision),
        ),  # fmt: skip
        TrainingMonitor: TrainingMonitor(cfg.callbacks.monitor),  # always on: NaN guard, norms for clipping
        ModelCheckpoint: _checkpoint_callback(cfg, run_dir),
        RandomState: RandomState(),  # RNG states in checkpoints; evaluation leaves the training stream alone
        HellaSwagEval: HellaSwagEval(h, cfg.precision.trainer_precision) if h.enabled else None,
        StoppingThreshold: None if stop_below is None else StoppingThreshold(stop_below),
        TorchProfiler: TorchProfiler(profiler, run_dir / "profile") if profiler.enabled else None,
    }


def _build_trainer(cfg: TrainConfig, plan: RunPlan, run_dir: Path, loggers: list, callbacks: list) -> L.Trainer:
    show_progress = cfg.callbacks.progress_bar_refresh_rate > 0
    if show_progress:
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.callbacks.progress_bar_refresh_rate))
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.distributed.num_nodes,
        # Inside a multirun Lightning must not re-run the command line for DDP's ranks: that is the sweep
        # (Lightning #11300). Spawned ranks never see it. torchrun/srun ranks are started outside, as they are.
        strategy=build_strategy(cfg, spawn=in_multirun() and external_launcher() is None),
        **_with_checkpoint_io(_precision_args(cfg)),
        max_steps=plan.total_steps,
        accumulate_grad_batches=plan.grad_accum,
        val_check_interval=cfg.eval.every_n_steps * plan.grad_accum,  # counted in micro-batches
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1 if cfg.eval.at_start else 0,  # -1: the whole validation set at step 0
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=show_progress,
        enable_model_summary=False,  # the header says it in one line
        use_distributed_sampler=False,  # the datamodule gives each rank its own batches
        deterministic=cfg.trainer.deterministic,
        detect_anomaly=cfg.trainer.detect_anomaly,
        default_root_dir=str(run_dir),
    )


def _checkpoint_callback(cfg: TrainConfig, run_dir: Path) -> RunCheckpoint:
    """step_XXXXXX.ckpt and last.ckpt every N steps, last.ckpt also at the end; written by AtomicCheckpointIO."""
    return RunCheckpoint(
        dirpath=run_dir / CHECKPOINTS_DIR,
        filename="step_{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.callbacks.checkpoint.every_n_steps,
        save_top_k=cfg.callbacks.checkpoint.save_top_k,
        monitor="step",
        mode="max",  # keeping the top k by step keeps the latest k
        save_last=True,  # a full save, not "link": a symlink to a step file that save_top_k may delete
        enable_version_counter=False,  # a run resumed into its folder rewrites step files, no step_X-v1.ckpt
        resume_from=cfg.ckpt_path,
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


def _parallelism(cfg: TrainConfig) -> str:
    d = cfg.distributed
    nodes = f" on {d.num_nodes} nodes" if d.num_nodes > 1 else ""
    if d.name == "fsdp":
        return f"fsdp {d.sharding_strategy}, {d.state_dict_type} checkpoints{nodes}"
    return f"{d.name}{nodes}"


@rank_zero_only
def _print_header(cfg: TrainConfig, plan: RunPlan, module: GPTModule, trainer, run_dir: Path, choices) -> None:
    d = cfg.data
    model_name = choices.get("model", "model")
    rows = [
        f"model      {model_name}: {module.model.num_params() / 1e6:.2f}M parameters "
        f"({module.model.num_params(non_embedding=True) / 1e6:.2f}M without position embeddings), "
        f"{cfg.model.n_layer} layers, {cfg.model.n_head} heads, d={cfg.model.n_embd}, vocab {cfg.model.vocab_size}",
        f"           {_architecture(cfg.model)}",
        f"batch      {plan.tokens_per_step:,} tokens/step = micro-batch {d.micro_batch_size} x seq {d.seq_len} "
        f"x {plan.world_size} device(s) x {plan.grad_accum} accumulation step(s)",
        "           global_batch_tokens fixes the optimization: more devices or a larger micro-batch mean fewer "
        "accumulation steps, the same updates",
        f"budget     {plan.total_steps:,} steps = {plan.total_tokens:,} tokens, set by {plan.budget}; "
        f"lr {cfg.optimizer.lr:g} ({choices.get('optimizer', cfg.optimizer.name)}, "
        f"{choices.get('scheduler', cfg.scheduler.name)}, warmup {cfg.scheduler.warmup_steps})",
        f"hardware   {trainer.accelerator.__class__.__name__.replace('Accelerator', '').lower()} x "
        f"{plan.world_size} ({_parallelism(cfg)}), precision {cfg.precision.name} ({cfg.precision.trainer_precision}), "
        f"torch {torch.__version__}, python {platform.python_version()}",
        f"data       {d.name} ({d.dir}), {'documents shuffled each epoch' if d.shuffle else 'read in order'}; "
        f"validation {cfg.eval.val_tokens:,} tokens every {cfg.eval.every_n_steps} steps",
        f"run folder {run_dir}",
    ]
    print("\n".join(["gptlab", *(f"  {r}" for r in rows)]), flush=True)


