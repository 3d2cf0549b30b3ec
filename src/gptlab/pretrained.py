"""Load a GPT for the eval, sample and export scripts: from a gptlab training checkpoint (a .ckpt file, or
the folder a distributed=fsdp run writes), a Hugging Face GPT-2 folder, or a hub name such as `gpt2` (online)."""

import warnings
from pathlib import Path

import torch

from gptlab.config import SHARDED_META, is_sharded_checkpoint
from gptlab.errors import ConfigError, DataError
from gptlab.internals import COMPILED_PREFIX
from gptlab.model import GPT
from gptlab.model_config import gpt_config_from_checkpoint

MODULE_PREFIX = "model."  # GPTModule keeps the GPT as `self.model`
DCP_INDEX = ".metadata"  # in a sharded checkpoint: torch.distributed.checkpoint's index of the shards


def resolve_device(name: str) -> str:
    """The `device` key of the eval, sample and export scripts: auto is cuda where there is a GPU, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} asked for, but no GPU is available here (use device=cpu)")
    return name


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the scripts' `dtype` key


def resolve_dtype(name: str, device: str) -> str:
    """The `dtype` key of the eval scripts: auto is bf16 on a GPU that has it, else fp32."""
    if name == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return name


def load_model(name_or_path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """A gptlab checkpoint, a Hugging Face GPT-2 folder (config.json + weights) or a hub model name."""
    path = Path(name_or_path)
    if path.is_file() or is_sharded_checkpoint(path):
        return load_gpt(path, map_location)
    from gptlab.hf import import_hf_gpt2  # transformers is an optional extra

    return import_hf_gpt2(str(name_or_path)).to(map_location).eval()


def load_gpt(path: str | Path, map_location: str | torch.device = "cpu") -> GPT:
    """The GPT of a gptlab checkpoint written by scripts/train.py, in eval mode: a Lightning .ckpt file, or a
    sharded checkpoint folder (distributed=fsdp: each rank's shard, and meta.pt with everything else).

    The GPT is built from the checkpoint's model config alone, checked by the model's own rules: a checkpoint
    stays loadable when a training rule changes. Loaded with weights_only=True: a checkpoint holds tensors and
    plain config values only."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _load_sharded(path).to(map_location).eval()
    if not path.is_file():
        raise DataError(f"no checkpoint file or sharded checkpoint folder at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        state = ckpt["state_dict"]
    except Exception as e:  # not a checkpoint, a damaged one, or another project's
        raise DataError(f"{path} is not a gptlab checkpoint ({type(e).__name__}: {e})") from None
    model = GPT(gpt_config_from_checkpoint(ckpt, str(path)))
    weights = {k.removeprefix(MODULE_PREFIX): v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    model.load_state_dict({k.replace(COMPILED_PREFIX, ""): v for k, v in weights.items()})
    return model.eval()


def _load_sharded(path: Path) -> GPT:
    """A GPT built from meta.pt's config, its weights read from the shards by torch.distributed.checkpoint,
    in place and in one process (no process group, no conversion to a full file, no optimizer state)."""
    import torch.distributed.checkpoint as dcp

    if not (path / DCP_INDEX).is_file():
        raise DataError(f"{path} has {SHARDED_META} but no {DCP_INDEX}: a sharded checkpoint cut short, or not one")
    try:
        meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
        model = GPT(gpt_config_from_checkpoint(meta, str(path)))
        weights = {MODULE_PREFIX + k: v for k, v in model.state_dict().items()}  # views of the parameters
        with warnings.catch_warnings():  # no_dist: each process reads the whole model, as intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"state_dict": weights}, checkpoint_id=path, no_dist=True)  # "optimizer_0" beside it: unread
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException (e.g. a missing shard) is a BaseException
        if isinstance(e, dcp.CheckpointException):  # it wraps each rank's exception with a whole traceback
            e = next(iter(e.failures.values()))[0]
        raise DataError(f"{path} is not a gptlab sharded checkpoint ({type(e).__name__}: {e})") from None
    return model
