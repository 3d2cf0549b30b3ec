"""The LightningModule: next-token prediction with the GPT of model.py, its optimizer and a per-step LR schedule.

One optimizer step, in the order Lightning runs it, all here:
1. `training_step` on each micro-batch: forward, loss; Lightning runs backward on loss / grad_accum (under DDP
   all-reducing the gradients in the last micro-step only). The last micro-step also takes the step's loss,
   the mean over micro-steps and ranks.
2. `on_before_optimizer_step`, after the last backward (and after Lightning's fp16 unscaling): the gradient
   norm, ONE host sync for the step's numbers, the non-finite guard (stop, or skip the update), clipping.
3. Lightning's optimizer step (under fp16 GradScaler's, which skips overflowed steps), then the LR schedule.
4. `on_train_batch_end`: at the budget's last step, stop, so that Lightning validates it inside fit.
Callbacks (gptlab.callbacks) only observe: they read `step_stats` and `step_outcome`, and add what they measure
to `step_metrics`, the step's line for the loggers.
"""

import math
import warnings
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn import functional as F

from gptlab.config import RunPlan, TrainConfig
from gptlab.data.config import data_sources
from gptlab.data.tokenizer import token_byte_lengths
from gptlab.distributed import full_tensor, shard_gpt
from gptlab.errors import UserInputError
from gptlab.internals import loss_scale, unscales_in_step
from gptlab.model import GPT
from gptlab.model_config import GPT_CONFIG_KEY, gpt_config_record
from gptlab.schedules import build_scheduler

NOT_FOR_GPTLAB = (
    # Lightning 2.6 on torch 2.13, on every run: an internal use of a deprecated torch API.
    r".*isinstance\(treespec, LeafSpec\)",
    # Under DDP, Lightning suggests sync_dist for epoch-level logs: val/loss is reduced over ranks already, and
    # "step" is the same on every rank.
    r".*It is recommended to use `self.log\('(val/loss|val/bpb|step)[/'\w.-]*",
    # Resuming mid-epoch, Lightning warns that the loader is not resumable: TokenDataModule restores its position.
    r".*your dataloader is not resumable",
    # Checkpoints of gptlab before StepCheckpoints hold the state of its RunCheckpoint, which nothing needs now.
    r".*callbacks used to create the checkpoint need to be provided.*RunCheckpoint",
)  # Lightning warnings that do not apply to this module (silenced in setup, in every rank's process)


class NonFiniteLossError(UserInputError):
    """The loss or the gradients were NaN/Inf and on_nan=stop."""

    label = "Training stopped"
    status = "diverged"


class GPTModule(L.LightningModule):
    """`cfg` has passed gptlab.config.load_config: it is used as is, never checked again."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        # The run's config as plain values, for the record (checkpoints load with weights_only=True); loading a
        # model from a checkpoint reads its GPT_CONFIG_KEY alone (gptlab.pretrained).
        self.save_hyperparameters({"config": asdict(cfg)}, logger=False)  # train.py logs it, with the overrides
        self.model = GPT(cfg.model)
        self._train_loss_sum = torch.zeros(())  # over the micro-steps of the current optimizer step
        self.val_sources = [s.name for s in data_sources(cfg.data)] if cfg.data.mixture else []  # val/loss/<source>
        self._val_sums = torch.zeros(max(len(self.val_sources), 1), 4)  # per source; see validation_step
        self.last_train_loss: torch.Tensor | None = None  # this optimizer step's loss, mean over micro-steps and ranks
        # The last optimizer step's numbers on the host: loss, grad_norm (before clipping), loss_scale (fp16).
        self.step_stats: dict[str, float] = {}
        # What became of its update: applied | overflow (fp16: GradScaler skips it) | nan_skipped (on_nan=skip)
        self.step_outcome: str | None = None
        # The step's line for the loggers, {name: number}: this module's and the callbacks' (callbacks/step_log.py)
        self.step_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}  # the latest validation's val/loss and val/bpb (and per source)
        self.initial_val_metrics: dict[str, float] = {}  # those of the validation before the first step
        self._token_bytes: torch.Tensor | None = None  # UTF-8 bytes of each token id, for val/bpb
        self.loaded_step: int | None = None  # the optimizer step of the checkpoint this run started from
        self._configured = False

    def setup(self, stage: str) -> None:
        for message in NOT_FOR_GPTLAB:
            warnings.filterwarnings("ignore", message=message)

    def configure_model(self) -> None:
        """Once the processes are set up (Lightning calls this again for each fit/validate: the work is done once)."""
        if self._configured:
            return
        self._configured = True
        if self.device_mesh is not None:  # distributed=fsdp: shard (and compile) block by block
            shard_gpt(self.model, self.device_mesh["data_parallel"], self.cfg)
        elif self.cfg.model.compile:  # in place: state_dict keys, checkpoints and callbacks see the plain GPT
            self.model.compile()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        self._train_loss_sum += loss.detach()
        if (batch_idx + 1) % self.plan.grad_accum == 0:  # last micro-step: the mean over micro-steps and ranks
            mean = self.trainer.strategy.reduce(self._train_loss_sum / self.plan.grad_accum, reduce_op="mean")
            # For the progress bar; the loggers get it in the step's line (step_metrics, callbacks/step_log.py).
            self.log("train/loss", mean, prog_bar=True, logger=False)
            self.last_train_loss = mean
            self._train_loss_sum = torch.zeros((), device=self.device)
        return loss  # Lightning divides by grad_accum before backward

    def on_train_start(self) -> None:
        # Also here: a run resumed mid-epoch gets no on_train_epoch_start, and a spawned rank must not add into
        # the tensor made in __init__ (spawn shares it between the ranks).
        self._train_loss_sum = torch.zeros((), device=self.device)

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum = torch.zeros((), device=self.device)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros_like(self._val_sums, device=self.device)
        if self._token_bytes is None or self._token_bytes.device != self.device:
            self._token_bytes = torch.tensor(token_byte_lengths(self.cfg.model.vocab_size), device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """Sums over each source's target tokens: loss (nats), count; and for bits per byte, the loss of tokens
        that are text and their UTF-8 bytes (<|endoftext|> has none: it is left out of both, as nanochat does)."""
        x, y, weight, source = batch  # weight 0: a padding batch (see ValidationBatches); source: of each row
        logits, _ = self.model(x)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view_as(y)
        n_bytes = self._token_bytes[y]
        rows = torch.stack([losses.sum(1), losses.new_full((len(y),), y.size(1)), (losses * (n_bytes > 0)).sum(1),
                            n_bytes.sum(1).float()], dim=1)  # fmt: skip
        self._val_sums.index_add_(0, source, weight * rows)

    def on_validation_epoch_end(self) -> None:
        # Over every rank's share of the fixed validation windows: the token-weighted mean loss (nats per token),
        # and bits per UTF-8 byte of the same targets, comparable across tokenizers and vocabularies; pooled over
        # the sources, and for each source of a mixture.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        metrics = val_metrics(sums.sum(0))
        for name, source_sums in zip(self.val_sources, sums):
            metrics |= {f"{key}/{name}": value for key, value in val_metrics(source_sums).items()}
        # trainer.validate() of a checkpoint restores its weights, not its loop counters (global_step 0)
        step = self.global_step if self.trainer.state.fn == "fit" else self.loaded_step or 0
        self.val_metrics = {name: float(value) for name, value in metrics.items()}
        if self.trainer.sanity_checking:  # the run's starting point; Lightning drops sanity-check logs
            self.initial_val_metrics = self.val_metrics
            for logger in self.loggers:
                logger.log_metrics(self.val_metrics, step=step)
        else:
            for name, value in metrics.items():
                self.log(name, value, prog_bar=name == "val/loss")
            self.log("step", float(step))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Beside Lightning's state (global_step, optimizer, ...) and the RNG states (callbacks/random_state.py).
        checkpoint[GPT_CONFIG_KEY] = gpt_config_record(self.cfg.model)
        checkpoint["tokens"] = self.global_step * self.plan.tokens_per_step
        checkpoint["initial_val_metrics"] = self.initial_val_metrics  # a resumed run skips the validation at its start

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # gptlab.resume checked, before Lightning loaded, that this run's config may continue the checkpoint's.
        before_bpb = {"val/loss": checkpoint.get("initial_val_loss")}  # the record of checkpoints before val/bpb
        self.initial_val_metrics = checkpoint.get("initial_val_metrics", before_bpb)
        self.loaded_step = checkpoint["global_step"]

    def configure_optimizers(self):
        optimizer = self.cfg.optimizer.build(self.model)
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.plan.total_steps, self.cfg.model.n_embd)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        """The gradients of the step are complete (summed over micro-steps, all-reduced over ranks); the update
        follows. Measure, guard, clip: the whole of gptlab's say in the step."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # fp16's GradScaler, else None
        if scaler is not None and unscales_in_step(optimizer):
            scaler.unscale_(optimizer)  # Lightning left a fused optimizer's gradients scaled; clipping needs them true
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = full_tensor(torch.nn.utils.get_total_norm(grads))  # FSDP: the norm over every rank's shards
        measured = {"loss": self.last_train_loss, "grad_norm": norm}
        if scaler is not None:
            measured["loss_scale"] = loss_scale(scaler)  # the scale of this step's backward
        values = torch.stack([v.float() for v in measured.values()]).tolist()  # the step's one host sync
        self.step_stats = dict(zip(measured, values))
        # "step", the loggers' x-axis, counts the optimizer steps completed once this update is applied
        step = self.global_step + 1
        self.step_metrics |= {"train/loss": self.step_stats["loss"], "tokens": float(step * self.plan.tokens_per_step)}
        self.step_outcome = self._guard(optimizer, fp16=scaler is not None)
        if self.step_outcome == "applied" and self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), self.cfg.grad_clip, norm)

    def _guard(self, optimizer, fp16: bool) -> str:
        """A non-finite loss or gradient norm: stop the run, or drop this update (on_nan). Under fp16, non-finite
        gradients with a finite loss are an ordinary overflow that GradScaler skips (halving the scale).
        Every rank holds the same loss and norm, so all decide alike."""
        loss, norm = self.step_stats["loss"], self.step_stats["grad_norm"]
        if math.isfinite(loss) and math.isfinite(norm):
            return "applied"
        if fp16 and math.isfinite(loss):
            return "overflow"
        step = self.global_step + 1  # the step this update would complete, as the loggers count
        if self.cfg.on_nan == "stop":
            what = "loss" if not math.isfinite(loss) else "gradients"
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (train loss {loss}, gradient norm {norm}); the update of "
                f"step {step} was not applied and no checkpoint holds it. Lower optimizer.lr, check the data, "
                "or set on_nan=skip to skip such batches"
            )
        # No gradients: the optimizer leaves weights and state alone (GradScaler's skip, for any precision).
        # The step still counts: its batch is consumed and the LR schedule moves on.
        optimizer.zero_grad(set_to_none=True)
        rank_zero_warn(f"non-finite loss or gradients at step {step}: update skipped (on_nan=skip)")
        return "nan_skipped"

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The budget's last step: stopping makes Lightning validate it inside fit (it would not otherwise,
        # unless eval.every_n_steps divides the budget).
        if self.global_step >= self.trainer.max_steps:
            self.trainer.should_stop = True


def val_metrics(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """val/loss and val/bpb from validation_step's sums: loss, tokens, loss of text tokens, their bytes."""
    loss_sum, count, text_loss_sum, n_bytes = sums
    return {"val/loss": loss_sum / count, "val/bpb": text_loss_sum / (math.log(2) * n_bytes)}
