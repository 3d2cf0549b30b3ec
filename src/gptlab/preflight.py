"""Checks of this machine that a run would otherwise fail later, after Lightning has loaded or a step has run:
the accelerator asked for is here, and the run folder can be written. Each is one line naming the key or folder.

Read-only (a probe file is created and removed under a unique name), so every rank of a distributed run may
check at once."""

import tempfile
from pathlib import Path

from gptlab.config import CHECKPOINTS_DIR, TrainConfig
from gptlab.errors import ConfigError, DiskError

PROBE_PREFIX = ".gptlab-write-probe-"


def check_run(cfg: TrainConfig, run_dir: Path) -> None:
    """ConfigError for an accelerator this machine lacks, DiskError for a run folder (or its checkpoints/) that
    cannot be written. Before Lightning is imported: its own errors are tracebacks, some after the first step."""
    check_accelerator(cfg.trainer.accelerator)
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        check_writable(run_dir, f"cannot write in the run folder {run_dir}")
    else:
        parent = _existing(run_dir)
        check_writable(parent, f"cannot create the run folder {run_dir} in {parent}")
    checkpoints = run_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir():  # a run resumed in its folder writes its checkpoints there
        check_writable(checkpoints, f"cannot write in the run's checkpoint folder {checkpoints}")


def check_accelerator(accelerator: str) -> None:
    """trainer.accelerator=gpu, cuda or mps on a machine that has none."""
    if accelerator not in ("gpu", "cuda", "mps"):
        return
    import torch  # here: the config is checked before torch loads (gptlab.train)

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.accelerator",
            f"asked for {accelerator}, but this machine has no GPU (torch.cuda.is_available() is False); "
            "use trainer.accelerator=cpu or auto",
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "trainer.accelerator",
            "asked for mps, but this machine has no Apple GPU (torch.backends.mps.is_available() is False); "
            "use trainer.accelerator=cpu or auto",
        )


def check_writable(folder: Path, what: str) -> None:
    """A file created and removed in `folder`, else a DiskError beginning with the OS's words, then `what`.
    A real write, not os.access, which says yes to root whatever the folder's permission bits."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PROBE_PREFIX):
            pass
    except OSError as e:
        raise DiskError(f"{e.strerror or e}: {what}") from None


def _existing(folder: Path) -> Path:
    """Where `folder` would be created: its nearest ancestor that exists."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder
