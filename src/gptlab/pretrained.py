"""Load a GPT for the eval, sample and export scripts: from a gptlab training checkpoint (a .ckpt file, or
the folder a distributed=fsdp run writes), a Hugging Face GPT-2 folder, or a hub name such as `gpt2` (online)."""

import warnings
from pathlib import Path

import torch

from gptlab.checkpoint_file import read_checkpoint
from gptlab.config import SHARDED_META, is_sharded_checkpoint
from gptlab.errors import ConfigError, DataError
from gptlab.internals import COMPILED_PREFIX
from gptlab.model import GPT
from gptlab.model_config import gpt_config_from_checkpoint

MODULE_PREFIX = "model."  # GPTModule keeps the GPT as `self.model`
DCP_INDEX = ".metadata"  # in a sharded checkpoint: torch.distributed.checkpoint's index of the shards
DCP_PREFIX = "state_dict." + MODULE_PREFIX  # a sharded checkpoint's names for the GPT's tensors


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
    plain config values only. A file that does not read, or weights that do not fit the config, is a DataError."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return _load_sharded(path).to(map_location).eval()
    if not path.is_file():
        raise DataError(f"no checkpoint file or sharded checkpoint folder at {path}")
    ckpt = read_checkpoint(path, map_location=map_location)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):  # another project's checkpoint
        raise DataError(f"{path} is not a gptlab checkpoint: it has no state_dict")
    model = GPT(gpt_config_from_checkpoint(ckpt, str(path)))
    weights = {k.removeprefix(MODULE_PREFIX): v for k, v in state.items() if k.startswith(MODULE_PREFIX)}
    weights = {k.replace(COMPILED_PREFIX, ""): v for k, v in weights.items()}
    check_weights(model, {k: getattr(v, "shape", None) for k, v in weights.items()}, path)
    model.load_state_dict(weights)
    return model.eval()


def check_weights(model: GPT, shapes: dict[str, tuple | None], path: Path) -> None:
    """A DataError naming the first tensor of the checkpoint (name: shape, None for a value that is not a tensor)
    that the model of its own config lacks, or has with another shape: an edited or mixed-up checkpoint, told in
    one line rather than load_state_dict's report."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: None if shape is None else tuple(shape) for k, shape in shapes.items()}
    problems = [f"no tensor {k}" for k in expected if k not in found]
    problems += [_other_shape(k, found[k], expected[k]) for k in expected if k in found and found[k] != expected[k]]
    problems += [f"tensor {k} is not in the config's model" for k in found if k not in expected]
    if problems:
        c = model.config
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(
            f"{path}: its weights do not match its model config (n_layer={c.n_layer}, n_head={c.n_head}, "
            f"n_embd={c.n_embd}, vocab_size={c.vocab_size}): {problems[0]}{more}"
        )


def _other_shape(name: str, found: tuple | None, expected: tuple) -> str:
    if found is None:
        return f"{name} is not a tensor"
    return f"tensor {name} has shape {list(found)}, where the config's model has {list(expected)}"


def _load_sharded(path: Path) -> GPT:
    """A GPT built from meta.pt's config, its weights read from the shards by torch.distributed.checkpoint,
    in place and in one process (no process group, no conversion to a full file, no optimizer state)."""
    import torch.distributed.checkpoint as dcp

    if not (path / DCP_INDEX).is_file():
        raise DataError(f"{path} has {SHARDED_META} but no {DCP_INDEX}: a sharded checkpoint cut short, or not one")
    meta = read_checkpoint(path / SHARDED_META, map_location="cpu")
    model = GPT(gpt_config_from_checkpoint(meta, str(path)))
    try:
        index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # each tensor's name and size
        shapes = {k.removeprefix(DCP_PREFIX): getattr(v, "size", None) for k, v in index.items()
                  if k.startswith(DCP_PREFIX)}  # fmt: skip
        check_weights(model, shapes, path)  # dcp.load would ignore tensors the model lacks
        weights = {MODULE_PREFIX + k: v for k, v in model.state_dict().items()}  # views of the parameters
        with warnings.catch_warnings():  # no_dist: each process reads the whole model, as intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load({"state_dict": weights}, checkpoint_id=path, no_dist=True)  # "optimizer_0" beside it: unread
    except DataError:
        raise
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException (e.g. a missing shard) is a BaseException
        if isinstance(e, dcp.CheckpointException):  # it wraps each rank's exception with a whole traceback
            e = next(iter(e.failures.values()))[0]
        raise DataError(f"{path} is not a gptlab sharded checkpoint ({type(e).__name__}: {e})") from None
    return model
