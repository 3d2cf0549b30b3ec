"""HellaSwag accuracy during training: every `every_n_steps` optimizer steps and after the last one."""

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from gptlab.callbacks.step_end import OnOptimizerStepEnd
from gptlab.errors import DataError
from gptlab.eval.config import HellaSwagConfig
from gptlab.eval.hellaswag import evaluate, hellaswag_file, load_examples

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class HellaSwagEval(OnOptimizerStepEnd):
    def __init__(self, cfg: HellaSwagConfig, trainer_precision: str):
        self.cfg = cfg
        self.autocast_dtype = AUTOCAST_DTYPES.get(trainer_precision)
        self.examples: list | None = None
        self.result: dict | None = None  # the latest scores, for summary.json
        self._scored_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":  # the validation after training needs no HellaSwag
            return
        path = hellaswag_file(self.cfg.path, Path(self.cfg.cache_dir), download=self.cfg.download)
        if path is None:
            message = (
                "HellaSwag: no data file. Set eval.hellaswag.path=<hellaswag_val.jsonl>, or run once with "
                f"network access so that it is downloaded into {self.cfg.cache_dir}"
            )
            if self.cfg.if_missing == "fail":
                raise DataError(message + " (eval.hellaswag.if_missing=fail)")
            rank_zero_warn(message + "; training continues without it (eval.hellaswag.if_missing=warn)")
            return
        examples = load_examples(path)
        self.examples = examples if self.cfg.limit is None else examples[: self.cfg.limit]

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        every = self.cfg.every_n_steps
        if self.examples and every and step % every == 0:
            self._log(trainer, self._score(pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.examples and trainer.global_step != self._scored_step:
            self._log(trainer, self._score(pl_module))

    @staticmethod
    def _log(trainer, metrics: dict[str, float]) -> None:
        # Straight to the loggers at this step: self.log would attach the scores to a later step's row.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _score(self, pl_module) -> dict[str, float]:
        self.result = evaluate(  # in eval mode and without gradients; counts reduced over ranks
            pl_module.model,
            self.examples,
            batch_size=self.cfg.batch_size,
            device=pl_module.device,
            autocast_dtype=self.autocast_dtype,
        )
        self._scored_step = pl_module.global_step
        return {"hellaswag/acc": self.result["acc"], "hellaswag/acc_norm": self.result["acc_norm"]}
