"""HellaSwag accuracy of a model: `python scripts/eval_hellaswag.py checkpoint=<path or name> [limit=N] ...`.

checkpoint is a gptlab .ckpt, a Hugging Face GPT-2 folder or a hub name (see conf/eval_hellaswag.yaml for
the knobs). Prints a short table, then one line of JSON: {"acc": ..., "acc_norm": ..., "n": ...}.
"""

import json
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptlab.errors import DataError, exit_on_config_error, exit_on_user_error
from gptlab.eval.config import HellaSwagFileConfig
from gptlab.eval.hellaswag import EvalHellaSwagConfig, evaluate, hellaswag_file, load_examples
from gptlab.pretrained import load_model, resolve_device
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="eval_hellaswag")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(load(EvalHellaSwagConfig, cfg))


def run(cfg: EvalHellaSwagConfig) -> None:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    examples = load_examples(data_file(cfg.eval.hellaswag))
    model = load_model(cfg.checkpoint, map_location=device)
    if cfg.compile:
        model.compile()  # in place: the model keeps its class and config
    started = time.time()
    result = evaluate(
        model, examples, batch_size=cfg.batch_size, device=device, autocast_dtype=AUTOCAST_DTYPES[dtype], limit=cfg.limit
    )
    seconds = time.time() - started
    print(f"HellaSwag (validation, completion style) of {cfg.checkpoint}")
    print(f"  {'device':<10}{device} ({dtype}, batch_size={cfg.batch_size}, compile={cfg.compile})")
    print(f"  {'examples':<10}{result['n']:,} in {seconds:.1f} s ({result['n'] / max(seconds, 1e-9):,.1f}/s)")
    print(f"  {'acc':<10}{result['acc']:.4f} ({result['correct']:,} correct)")
    print(f"  {'acc_norm':<10}{result['acc_norm']:.4f} ({result['correct_norm']:,} correct)")
    print(json.dumps({key: result[key] for key in ("acc", "acc_norm", "n")}))


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


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return name


if __name__ == "__main__":
    main()
