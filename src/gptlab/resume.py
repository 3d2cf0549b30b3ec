"""Resuming a run: which checkpoint `ckpt_path` names, and whether this config may continue it.

ckpt_path is a checkpoint file, a sharded checkpoint folder (distributed=fsdp), a run folder (its newest whole
checkpoint), or `auto`: this run's folder's newest whole checkpoint, and a fresh start when there is none, which is
what a job that a scheduler may preempt and requeue wants. "Whole" is a checkpoint that reads: last.ckpt, or when
that is missing or damaged the newest step_XXXXXX.ckpt.

A resumed run continues the same optimization, so its config must be the checkpoint's except for the keys in
MAY_CHANGE: the budget (the schedule follows the new length), what is evaluated, logged or saved, where files are,
and how fast it runs. Any other difference is refused with the key, both values and the checkpoint, before
Lightning loads, rather than printed in the header while the checkpoint's value is used.
"""

import os
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from omegaconf import DictConfig

from gptlab.config import (
    BUDGET_KEYS,
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT,
    SHARDED_META,
    STEP_FILE,
    FSDPConfig,
    TrainConfig,
    is_sharded_checkpoint,
)
from gptlab.errors import ConfigError, DataError
from gptlab.model_config import RUNTIME_FIELDS, gpt_config_from_checkpoint

AUTO = "auto"  # ckpt_path=auto

# Keys a resumed run may set differently from its checkpoint (fnmatch patterns over dotted keys).
MAY_CHANGE = (
    *BUDGET_KEYS,  # extend or shorten the run: the schedule is rebuilt for the new number of steps
    "ckpt_path", "overwrite", "tags", "on_nan", "paths.*", "logger.*", "eval.*", "callbacks.*",
    "trainer.accelerator", "trainer.devices", "distributed.*",  # the data layout keeps the world size (datamodule)
    "trainer.log_every_n_steps", "trainer.deterministic", "trainer.detect_anomaly",
    "trainer.stopping_threshold", "trainer.requeue",
    *(f"model.{name}" for name in RUNTIME_FIELDS),  # the same weights, the same function
    "model.depth", "model.aspect_ratio", "model.head_dim",  # only set the sizes, which are compared
    "data.dir", "data.mixture.*.dir", "data.verify_checksums", "data.num_workers", "data.max_repeats",
    "data.prepare.*",  # the prepared dataset itself is compared by its checksums (datamodule)
)  # fmt: skip


@dataclass(frozen=True)
class Resume:
    """Where a run starts: `path` (a checkpoint) at `step`, or afresh (path None); `note` says which, for the header."""

    path: str | None
    step: int
    note: str


def config_in_place(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, list[str] | None]:
    """A run resumed in its own folder (ckpt_path=auto, or the folder or one of its checkpoints) needs nothing but
    the folder: its config is composed again from the overrides the run recorded (.hydra/overrides.yaml), this
    command's added (a key given again takes this command's value, e.g. a longer budget). Returns that config and
    the overrides to record (the resume's ckpt_path left out, so that rerun.py starts the run afresh); for any
    other run, or outside a Hydra app, (cfg, None)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or not resumes_in(cfg.get("ckpt_path"), run_dir):
        return cfg, None
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        return cfg, None
    from hydra import compose

    from gptlab.errors import composition_error
    from gptlab.provenance import rerun_overrides

    given = list(HydraConfig.get().overrides.task)
    overrides = rerun_overrides(run_dir, given)
    if any(_key(o) in BUDGET_KEYS for o in given):  # a new budget replaces the run's, whichever key set that
        overrides = [o for o in overrides if _key(o) not in BUDGET_KEYS or o in given]
    try:
        composed = compose(config_name=HydraConfig.get().job.config_name, overrides=overrides)
    except Exception as e:  # e.g. a recorded override that today's conf/ no longer has
        raise composition_error(e) or e from None
    return composed, [o for o in overrides if not o.startswith("ckpt_path=")]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resumes_in(ckpt_path: str | None, run_dir: Path) -> bool:
    """Does ckpt_path resume the run of run_dir in it: auto, the folder itself, or a checkpoint in it?"""
    if ckpt_path is None:
        return False
    return ckpt_path == AUTO or Path(ckpt_path).resolve().is_relative_to(Path(run_dir).resolve())


def find_resume(cfg: TrainConfig, run_dir: Path) -> Resume:
    """The checkpoint cfg.ckpt_path names, read and checked against cfg; DataError for a file that does not read,
    ConfigError for a config that may not continue it."""
    if cfg.ckpt_path is None:
        return Resume(None, 0, "")
    sharded_ok = isinstance(cfg.distributed, FSDPConfig)
    if cfg.ckpt_path == AUTO:
        found = newest_checkpoint(run_dir / CHECKPOINTS_DIR, sharded_ok)
        if found is None:
            return Resume(None, 0, f"ckpt_path=auto: no checkpoint in {run_dir / CHECKPOINTS_DIR}, starting fresh")
        path, checkpoint, skipped = found
    elif os.path.isdir(cfg.ckpt_path) and not is_sharded_checkpoint(cfg.ckpt_path):
        found = newest_checkpoint(Path(cfg.ckpt_path) / CHECKPOINTS_DIR, sharded_ok)
        if found is None:
            raise ConfigError("ckpt_path", f"the folder {cfg.ckpt_path} has no checkpoint in {CHECKPOINTS_DIR}/ to "
                              "resume from (give a run folder, a .ckpt file, a sharded checkpoint folder, or auto)")
        path, checkpoint, skipped = found
    else:
        path, checkpoint, skipped = cfg.ckpt_path, read_meta(cfg.ckpt_path, sharded_ok), ""
    check_resume(cfg, checkpoint, path)
    step = int(checkpoint["global_step"])
    return Resume(str(path), step, f"from {path} (step {step:,}){skipped}")


def newest_checkpoint(folder: Path, sharded_ok: bool = True) -> tuple[Path, dict, str] | None:
    """(path, metadata, note) of the newest checkpoint in `folder` that reads, or None: last.ckpt, unless a step
    file is newer (a kill while last.ckpt was first written) or last.ckpt is damaged (then the note says so)."""
    if not folder.is_dir():
        return None
    steps = sorted((int(m[1]), p) for p in folder.iterdir() if (m := STEP_FILE.fullmatch(p.name)))
    best, skipped = None, []
    for path in [folder / LAST_CHECKPOINT, *(p for _, p in reversed(steps))]:
        if not (path.is_file() or is_sharded_checkpoint(path)):
            continue
        try:
            meta = read_meta(path, sharded_ok)
        except DataError as e:
            skipped.append(str(e))
            continue
        if best is None or meta["global_step"] > best[1]["global_step"]:
            best = (path, meta)
    if best is None:
        if skipped:
            raise DataError(f"no checkpoint in {folder} reads: {'; '.join(skipped)}")
        return None
    return best[0], best[1], "".join(f"; skipped {s}" for s in skipped)


def read_meta(path: str | os.PathLike, sharded_ok: bool = True) -> dict:
    """A checkpoint's contents without reading its tensors (memory-mapped); a sharded checkpoint's meta.pt."""
    from gptlab.checkpoint_file import read_checkpoint  # loads torch

    if is_sharded_checkpoint(path):
        if not sharded_ok:
            raise ConfigError(
                "ckpt_path",
                f"{path} is a sharded checkpoint (a folder written by distributed=fsdp): resume it with "
                "distributed=fsdp on as many devices, or load its weights with gptlab.pretrained.load_gpt",
            )
        return read_checkpoint(Path(path) / SHARDED_META)
    if not os.path.isfile(path):
        raise ConfigError("ckpt_path", f"no checkpoint file, sharded checkpoint folder or run folder at {path}")
    checkpoint = read_checkpoint(path, mmap=True)
    if "global_step" not in checkpoint:
        raise DataError(f"{path} is not a training checkpoint (no global_step): not written by scripts/train.py")
    return checkpoint


def check_resume(cfg: TrainConfig, checkpoint: dict, path) -> None:
    """Refuse a config that would not continue the checkpoint's optimization: the first key outside MAY_CHANGE
    whose value differs, named with both values."""
    saved_model = asdict(gpt_config_from_checkpoint(checkpoint, str(path)))  # older records migrated
    saved = dict(_flat(checkpoint.get("hyper_parameters", {}).get("config", {}))) | dict(_flat(saved_model, "model."))
    for key, value in _flat(asdict(cfg)):
        if key in saved and saved[key] != value and not any(fnmatchcase(key, p) for p in MAY_CHANGE):
            raise ConfigError(
                key,
                f"is {value!r}, but the checkpoint {path} (step {checkpoint['global_step']:,}) was trained with "
                f"{saved[key]!r}: a resumed run continues the same optimization; set {key}={_override(saved[key])} "
                "(only the budget, evaluation, logging, checkpointing and runtime keys may change on resume)",
            )


def _flat(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _override(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

