"""HellaSwag accuracy during training: every `every_n_steps` optimizer steps and after the last one."""

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from gptlab.callbacks.step_end import PeriodicEvaluation
from gptlab.errors import DataError
from gptlab.eval.config import HellaSwagConfig
from gptlab.eval.hellaswag import METRICS, evaluate, hellaswag_file, load_examples

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def scored_examples(cfg: HellaSwagConfig, device_type: str) -> int | None:
    """How many of the first examples a run scores: limit, capped by cpu_limit on CPU; None: all."""
    limits = [cfg.limit, cfg.cpu_limit if device_type == "cpu" else None]
    return min((n for n in limits if n is not None), default=None)


def coverage(cfg, key: str, device_type: str, of_each: str = "") -> str:
    """What an evaluation scores and when, for the run's header, e.g. `the first 200 examples
    (eval.hellaswag.cpu_limit, on CPU), after the last step`. cfg: a config with limit, cpu_limit, every_n_steps."""
    n = scored_examples(cfg, device_type)
    if n is None:
        which = "all examples"
    else:
        limit = "limit" if n == cfg.limit else "cpu_limit, on CPU"
        which = f"the first {n:,} examples{of_each} ({key}.{limit})"
    every = cfg.every_n_steps
    return f"{which}, " + (f"every {every} steps and after the last" if every else "after the last step")


class HellaSwagEval(PeriodicEvaluation):
    def __init__(self, cfg: HellaSwagConfig, trainer_precision: str):
        super().__init__(cfg.every_n_steps)
        self.cfg = cfg
        self.autocast_dtype = AUTOCAST_DTYPES.get(trainer_precision)
        self.examples: list | None = None
        self.result: dict | None = None  # the latest scores, for summary.json

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
        examples = load_examples(path, self.cfg.prompt)
        self.examples = examples[: scored_examples(self.cfg, trainer.strategy.root_device.type)]

    def ready(self) -> bool:
        return bool(self.examples)  # without the data file, training goes on without HellaSwag

    def score(self, pl_module) -> dict[str, float]:
        self.result = evaluate(  # in eval mode and without gradients; counts reduced over ranks
            pl_module.model,
            self.examples,
            batch_size=self.cfg.batch_size,
            device=pl_module.device,
            autocast_dtype=self.autocast_dtype,
        )
        return {f"hellaswag/{metric}": self.result[metric] for metric in METRICS}
