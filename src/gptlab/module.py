"""The LightningModule: next-token prediction with the GPT of model.py, AdamW and a per-step LR schedule."""

from dataclasses import asdict

import lightning as L
import torch

from gptlab.config import RunPlan, TrainConfig
from gptlab.distributed import full_tensor, shard_gpt
from gptlab.errors import ConfigError
from gptlab.model import GPT
from gptlab.model_config import GPT_CONFIG_KEY, RUNTIME_FIELDS, gpt_config_from_checkpoint, gpt_config_record
from gptlab.schedules import build_scheduler


class GPTModule(L.LightningModule):
    """`cfg` has passed gptlab.config.load_config: it is used as is, never checked again."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        # The run's config as plain values, for the record (checkpoints load with weights_only=True); loading a
        # model from a checkpoint reads its GPT_CONFIG_KEY alone (gptlab.checkpoint).
        self.save_hyperparameters({"config": asdict(cfg)}, logger=False)  # train.py logs it, with the overrides
        self.model = GPT(cfg.model)
        self._train_loss_sum = torch.zeros(())  # over the micro-steps of the current optimizer step
        self._val_sums = torch.zeros(2)  # summed token loss, token count
        self.last_train_loss: torch.Tensor | None = None  # this optimizer step's loss, mean over micro-steps and ranks
        self.grad_norm: torch.Tensor | None = None  # this step's, before clipping (TrainingMonitor measures it)
        self.last_val_loss: float | None = None
        self.last_val_step: int | None = None  # the optimizer step last_val_loss was measured at
        self.initial_val_loss: float | None = None
        self._configured = False

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
            self.log("train/loss", mean, prog_bar=True)  # the same on every rank, so callbacks decide alike
            # "step" is the loggers' x-axis and names checkpoints: the optimizer steps completed once this
            # micro-step's update is applied (Lightning's own step would be one less).
            # CPU tensors: a Python float would be copied to the GPU, a host sync in the middle of the step.
            step = self.global_step + 1
            self.log("step", torch.tensor(float(step)))
            self.log("tokens", torch.tensor(float(step * self.plan.tokens_per_step)))
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
        self._val_sums = torch.zeros(2, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y, weight = batch  # weight 0: a padding batch (see ValidationBatches)
        _, loss = self.model(x, y)
        self._val_sums[0] += weight * loss.detach() * y.numel()
        self._val_sums[1] += weight * y.numel()

    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over every rank's share of the fixed validation windows.
        loss_sum, count = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        val_loss = loss_sum / count
        self.last_val_loss, self.last_val_step = float(val_loss), self.global_step
        if self.trainer.sanity_checking:  # the run's starting point; Lightning drops sanity-check logs
            self.initial_val_loss = self.last_val_loss
            for logger in self.loggers:
                logger.log_metrics({"val/loss": self.last_val_loss}, step=self.global_step)
        else:
            self.log("val/loss", val_loss, prog_bar=True)
            self.log("step", float(self.global_step))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Beside Lightning's state (global_step, optimizer, ...) and the RNG states of gptlab.resume.RandomState.
        checkpoint[GPT_CONFIG_KEY] = gpt_config_record(self.cfg.model)
        checkpoint["tokens"] = self.global_step * self.plan.tokens_per_step
        checkpoint["initial_val_loss"] = self.initial_val_loss  # a resumed run skips the validation at its start

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before the weights load: a resumed run must build the checkpoint's model (compile and activation
        checkpointing may change), else the weights would not fit or would compute another function."""
        saved = gpt_config_from_checkpoint(checkpoint)
        for key, value in asdict(saved).items():
            if key not in RUNTIME_FIELDS and getattr(self.cfg.model, key) != value:
                raise ConfigError(
                    f"model.{key}",
                    f"is {getattr(self.cfg.model, key)!r}, the checkpoint's model has {value!r}: resume with the "
                    "checkpoint's architecture (repeat the run's model overrides)",
                )
        self.initial_val_loss = checkpoint.get("initial_val_loss")

    def configure_optimizers(self):
        optimizer = self.cfg.optimizer.build(self.model)
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.plan.total_steps, self.cfg.model.n_embd)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping at cfg.grad_clip, just before the optimizer step. TrainingMonitor's
        on_before_optimizer_step (callbacks run first) has unscaled fp16 gradients, measured their norm, logged
        it and handled NaN; lr, loss scale and the other training dynamics are logged there too."""
        norm, self.grad_norm = self.grad_norm, None
        params = [p for p in self.parameters() if p.grad is not None]  # none when the monitor skipped the step
        if self.cfg.grad_clip > 0 and params:
            if norm is None:  # no TrainingMonitor in this Trainer
                norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
