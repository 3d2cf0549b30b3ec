"""The `eval` group: validation loss during training, and HellaSwag (gptlab/eval/hellaswag.py)."""

from dataclasses import dataclass, field
from typing import Optional

from gptlab.schema import at_least, knob, non_negative, one_of, optional


@dataclass
class HellaSwagFileConfig:
    """Where the HellaSwag validation file comes from (training and scripts/eval_hellaswag.py)."""

    path: Optional[str] = None  # a local hellaswag_val.jsonl; null: the copy cached in cache_dir
    cache_dir: str = "${paths.data_dir}/hellaswag"  # where the downloaded file is kept
    download: bool = True  # fetch the file into cache_dir once, when it is not there and the network is


@dataclass
class HellaSwagConfig(HellaSwagFileConfig):
    """HellaSwag (Zellers et al., 2019) during training, completion-style scoring as in build-nanogpt."""

    enabled: bool = True
    if_missing: str = knob("warn", one_of("warn", "fail"))  # no file: warn (once) and train without it | fail
    every_n_steps: int = knob(0, non_negative)  # also score every N optimizer steps (0: only after the last step)
    limit: Optional[int] = knob(200, optional(at_least(1)))  # the first N of the 10,042 examples (CPU-sized); null: all
    batch_size: int = knob(32, at_least(1))  # examples (4 rows each) per forward pass


@dataclass
class EvalConfig:
    every_n_steps: int = knob(12, at_least(1))  # validation loss every N optimizer steps and after the last one
    at_start: bool = True  # also validate before the first step, to log the starting loss
    val_tokens: int = knob(16384, at_least(1))  # held-out tokens per validation: the same prefix of the val split
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)
