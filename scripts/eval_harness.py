"""lm-evaluation-harness tasks on a model: `python scripts/eval_harness.py checkpoint=<path or name> tasks=[...]`.

checkpoint is a gptlab .ckpt, a Hugging Face GPT-2 folder or a hub name; tasks are lm-eval task names or presets
(small_models: hellaswag, arc_easy, arc_challenge, piqa, winogrande, lambada_openai); include_path=<folder> adds
task YAMLs, e.g. over local files on a machine without the hub (see conf/eval_harness.yaml for the knobs).
Prints lm-eval's table, then one line of JSON: {"<task>/<metric>": value, ...}.
"""

import json
import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.errors import exit_on_config_error, exit_on_user_error
from gptlab.eval.harness import EvalHarnessConfig, require_lm_eval, run_tasks
from gptlab.pretrained import AUTOCAST_DTYPES, load_model, resolve_device, resolve_dtype
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="eval_harness")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(load(EvalHarnessConfig, cfg))


def run(cfg: EvalHarnessConfig) -> None:
    require_lm_eval()  # before the model loads
    from lm_eval.utils import make_table

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its progress notes would bury the table
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(cfg.checkpoint, map_location=device)
    if cfg.compile:
        model.compile()  # in place: the model keeps its class and config
    started = time.time()
    results, metrics = run_tasks(
        model, cfg.tasks, limit=cfg.limit, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size, device=device,
        autocast_dtype=AUTOCAST_DTYPES[dtype], include_path=cfg.include_path, bootstrap_iters=cfg.bootstrap_iters,
    )  # fmt: skip
    print(f"lm-evaluation-harness of {cfg.checkpoint} on {device} ({dtype}, batch_size={cfg.batch_size}, "
          f"compile={cfg.compile}) in {time.time() - started:.1f} s")  # fmt: skip
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
