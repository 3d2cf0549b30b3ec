"""Load a GPT for the eval, sample and export scripts: from a gptlab training checkpoint, a Hugging Face
GPT-2 folder, or a hub name such as `gpt2` (when online)."""

from pathlib import Path

import torch

from gptlab.config import load_config
from gptlab.errors import DataError
from gptlab.model import GPT

MODULE_PREFIX = "model."  # GPTModule keeps the GPT as `self.model`
COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to parameter names


def load_model(name_or_path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """A gptlab .ckpt file, a Hugging Face GPT-2 folder (config.json + weights) or a hub model name."""
    path = Path(name_or_path)
    if path.is_file():
        return load_gpt(path, map_location)
    from gptlab.hf import import_hf_gpt2  # transformers is an optional extra

    return import_hf_gpt2(str(name_or_path)).to(map_location).eval()


def load_gpt(path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """The GPT of a gptlab checkpoint (a Lightning .ckpt written by scripts/train.py), in eval mode.

    Loaded with weights_only=True: a checkpoint holds tensors and plain config values only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        config = ckpt["hyper_parameters"]["config"]
        state = ckpt["state_dict"]
    except Exception as e:  # not a checkpoint, a damaged one, or another project's
        raise DataError(f"{path} is not a gptlab checkpoint ({type(e).__name__}: {e})") from None
    model = GPT(load_config(config)[0].model)
    weights = {k.removeprefix(MODULE_PREFIX): v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    model.load_state_dict({k.replace(COMPILED_PREFIX, ""): v for k, v in weights.items()})
    return model.eval()
