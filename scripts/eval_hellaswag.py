"""HellaSwag accuracy of a model: `python scripts/eval_hellaswag.py checkpoint=<path or name> [limit=N] ...`.

checkpoint is a gptlab .ckpt, a Hugging Face GPT-2 folder or a hub name (see conf/eval_hellaswag.yaml for
the knobs). Prints a short table, then one line of JSON: {"acc": ..., "acc_norm": ..., "acc_bytes": ..., "n": ...}.
"""

import json
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.errors import DataError, exit_on_config_error, exit_on_user_error
from gptlab.eval.config import HellaSwagFileConfig
from gptlab.eval.hellaswag import METRICS, EvalHellaSwagConfig, evaluate, hellaswag_file, load_examples
from gptlab.pretrained import AUTOCAST_DTYPES, load_model, resolve_device, resolve_dtype
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="eval_hellaswag")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(load(EvalHellaSwagConfig, cfg))


def run(cfg: EvalHellaSwagConfig) -> None:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    examples = load_examples(data_file(cfg.eval.hellaswag), cfg.eval.hellaswag.prompt)
    model = load_model(cfg.checkpoint, map_location=device)
    if cfg.compile:
        model.compile()  # in place: the model keeps its class and config
    started = time.time()
    result = evaluate(
        model, examples, batch_size=cfg.batch_size, device=device, autocast_dtype=AUTOCAST_DTYPES[dtype],
        limit=cfg.limit,
    )  # fmt: skip
    seconds = time.time() - started
    print(f"HellaSwag (validation, completion style, prompt {cfg.eval.hellaswag.prompt}) of {cfg.checkpoint}")
    print(f"  {'device':<10}{device} ({dtype}, batch_size={cfg.batch_size}, compile={cfg.compile})")
    print(f"  {'examples':<10}{result['n']:,} in {seconds:.1f} s ({result['n'] / max(seconds, 1e-9):,.1f}/s)")
    for metric, how in zip(METRICS, ("summed log-likelihood", "per token", "per byte")):
        correct = result[metric.replace("acc", "correct")]
        print(f"  {metric:<10}{result[metric]:.4f} ({correct:,} correct; {how})")
    print(json.dumps({key: result[key] for key in (*METRICS, "n")}))


def data_file(hellaswag: HellaSwagFileConfig) -> Path:
    cache_dir = Path(hellaswag.cache_dir)
    path = hellaswag_file(hellaswag.path, cache_dir, download=hellaswag.download)
    if path is None:
        raise DataError(
            "no HellaSwag data (no cached copy, and the download failed or is off): "
            "set eval.hellaswag.path=<hellaswag_val.jsonl>, "
            f"or run once with network so it is downloaded and cached in {cache_dir}"
        )
    return path


if __name__ == "__main__":
    main()
