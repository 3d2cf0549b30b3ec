"""The `eval` group: validation loss during training, HellaSwag (gptlab/eval/hellaswag.py) and
lm-evaluation-harness tasks (gptlab/eval/harness.py)."""

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Optional

from gptlab.schema import at_least, knob, non_negative, one_of, optional, require


@dataclass
class HellaSwagFileConfig:
    """Where the HellaSwag validation file comes from (training and scripts/eval_hellaswag.py)."""

    path: Optional[str] = None  # a local hellaswag_val.jsonl; null: the copy cached in cache_dir
    cache_dir: str = "${paths.data_dir}/hellaswag"  # where the downloaded file is kept
    download: bool = True  # fetch the file into cache_dir once, when it is not there and the network is
    # ctx: the file's ctx and endings as they are (build-nanogpt) | lm_eval: as lm-eval's hellaswag task builds
    # them ("activity_label: ctx_a Ctx_b", WikiHow's bracket artefacts removed), to agree with its numbers
    prompt: str = knob("ctx", one_of("ctx", "lm_eval"))


@dataclass
class HellaSwagConfig(HellaSwagFileConfig):
    """HellaSwag (Zellers et al., 2019) during training, completion-style scoring as in build-nanogpt."""

    enabled: bool = True
    if_missing: str = knob("warn", one_of("warn", "fail"))  # no file: warn (once) and train without it | fail
    every_n_steps: int = knob(0, non_negative)  # also score every N optimizer steps (0: only after the last step)
    limit: Optional[int] = knob(None, optional(at_least(1)))  # the first N of the 10,042 examples; null: all
    cpu_limit: Optional[int] = knob(200, optional(at_least(1)))  # on CPU, at most the first N (null: no cap)
    batch_size: int = knob(32, at_least(1))  # examples per forward pass (each example's context runs once)


LM_EVAL_MISSING = "needs lm-evaluation-harness: pip install -e .[eval] (requirements.txt pins it)"


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks during training, scored by gptlab's in-memory GPT (no conversion)."""

    tasks: list[str] = knob([])  # lm-eval task names, or a preset (small_models); empty: off
    every_n_steps: int = knob(0, non_negative)  # also score every N optimizer steps (0: only after the last step)
    limit: Optional[int] = knob(None, optional(at_least(1)))  # the first N examples of each task; null: all
    cpu_limit: Optional[int] = knob(100, optional(at_least(1)))  # on CPU, at most N per task (null: no cap)
    num_fewshot: Optional[int] = knob(None, optional(non_negative))  # examples in the prompt; null: each task's own
    batch_size: int = knob(32, at_least(1))  # rows per forward pass (a row: one context and its continuations)
    include_path: Optional[str] = None  # a folder of lm-eval task YAMLs (e.g. tasks over local files, offline)

    def check(self) -> None:
        if not self.tasks:
            return
        require(all(name.strip() for name in self.tasks), "tasks", f"must be task names (got {self.tasks!r})")
        require(importlib.util.find_spec("lm_eval") is not None, "tasks", LM_EVAL_MISSING)  # finds, not imports
        require(
            self.include_path is None or os.path.isdir(self.include_path),
            "include_path",
            f"no folder at {self.include_path} (a folder of lm-eval task YAMLs)",
        )


@dataclass
class EvalConfig:
    every_n_steps: int = knob(12, at_least(1))  # validation loss every N optimizer steps and after the last one
    at_start: bool = True  # also validate before the first step, to log the starting loss
    val_tokens: int = knob(16384, at_least(1))  # held-out tokens per validation: the same prefix of the val split
    sample_tokens: int = knob(32, non_negative)  # greedy tokens the result block shows at the end of a run; 0: none
    sample_prompt: str = "The"  # what the end-of-run sample continues
    hellaswag: HellaSwagConfig = field(default_factory=HellaSwagConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
