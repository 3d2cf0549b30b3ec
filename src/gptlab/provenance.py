"""What a run was made from, recorded in its folder at the start so that anyone can tell how to make it again:

- <run>/provenance.json: the command line, the git commit of the code and whether its tree was dirty,
  package versions, Python, the platform, and CUDA/cuDNN and GPUs when there are any;
- <run>/git.diff: `git diff HEAD` of that tree when it was dirty (uncommitted changes to tracked files).

The resolved config and the overrides are in <run>/.hydra/ (Hydra writes them). Only rank 0 writes; a
missing git, or code that is not in a git repository, is recorded as such and never fails a run.
"""

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from gptlab.files import atomic_write_bytes
from gptlab.launch import global_rank

PROVENANCE_FILE = "provenance.json"
DIFF_FILE = "git.diff"
PACKAGES = ("torch", "lightning", "hydra-core", "omegaconf", "wandb", "numpy", "tiktoken")
CODE_DIR = Path(__file__).resolve().parent  # the package's own tree, whatever the working directory


def write_provenance(run_dir: Path, argv: list[str] | None = None, code_dir: Path = CODE_DIR) -> dict | None:
    """Write provenance.json (and git.diff when the tree is dirty) into run_dir; rank 0 only. Returns the record."""
    if global_rank() != 0:
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    git, diff = git_state(code_dir)
    if diff:
        atomic_write_bytes(run_dir / DIFF_FILE, diff.encode())
        git["diff_file"] = DIFF_FILE
    else:
        (run_dir / DIFF_FILE).unlink(missing_ok=True)  # a run resumed in its folder from a clean tree
    argv = list(sys.argv if argv is None else argv)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "argv": argv,
        "cwd": os.getcwd(),
        "rerun": f"python scripts/rerun.py {shlex.quote(str(run_dir))}",  # see scripts/rerun.py
        "git": git,
        "versions": versions(),
        "host": socket.gethostname(),
    }
    atomic_write_bytes(run_dir / PROVENANCE_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return record


def git_state(code_dir: Path) -> tuple[dict, str]:
    """({"commit", "branch", "dirty", "untracked"} or {"error"}, the diff against HEAD or "")."""
    top = _git(code_dir, "rev-parse", "--show-toplevel")
    if top is None:
        return {"commit": None, "dirty": None, "error": "not a git repository, or git is not installed"}, ""
    code_dir = Path(top)  # git ls-files lists only what is under its working directory
    commit = _git(code_dir, "rev-parse", "HEAD")  # None in a repository with no commit yet
    diff = (_git(code_dir, "diff", "HEAD", "--no-color", "--no-ext-diff", strip=False) or "") if commit else ""
    untracked = (_git(code_dir, "ls-files", "--others", "--exclude-standard") or "").splitlines()
    state = {
        "root": top,
        "commit": commit,
        "branch": _git(code_dir, "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": bool(diff.strip()),  # tracked files differ from the commit (their diff is in git.diff)
        "untracked": untracked[:100],  # new files git does not ignore: not in the diff, listed here
    }
    return state, diff


def versions() -> dict:
    """Versions of Python, the platform, the packages a run depends on, and CUDA/cuDNN/GPUs if torch sees any."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    torch = sys.modules.get("torch")  # loaded by every training run; importing it here would cost seconds
    if torch is not None:
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def _git(cwd: Path, *args: str, strip: bool = True) -> str | None:
    """git's output, or None when git is missing or fails. GIT_OPTIONAL_LOCKS=0: a read never touches the index."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() if strip else proc.stdout


# Re-running a run from its folder (scripts/rerun.py): the current conf/ with the run's own overrides.


def rerun_overrides(run_dir: Path, extra: list[str] = ()) -> list[str]:
    """The run's overrides (<run>/.hydra/overrides.yaml) with `extra` added; an extra one replaces the run's own
    override of the same key (seed=1 replaces seed=0). A ckpt_path that resumed the run in its own folder (auto,
    or the folder's own checkpoint) is left out: it continued the run, it did not start it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder written by scripts/train.py?")
    saved = [str(o) for o in OmegaConf.load(path)]
    parser = OverridesParser.create()

    def key(o) -> str:
        return o.key_or_group + (f"@{o.package}" if o.package else "")

    replaced = {key(o) for o in parser.parse_overrides(list(extra))}
    kept = [s for s, o in zip(saved, parser.parse_overrides(saved))
            if key(o) not in replaced and not _resumed_in_place(o, run_dir)]  # fmt: skip
    return [*kept, *extra]


def _resumed_in_place(override, run_dir: Path) -> bool:
    if override.key_or_group != "ckpt_path":
        return False
    value = str(override.value())
    return value == "auto" or Path(value).resolve().is_relative_to(Path(run_dir).resolve())


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Where two configs differ, one line per key: `optimizer.lr: 0.003 in the run, 0.001 now`."""
    out = []
    for k in sorted(saved.keys() | current.keys(), key=str):
        name = f"{prefix}{k}"
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, prefix=f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} in the run, {b!r} now")
    return out


def saved_vs_current(run_dir: Path, conf_dir: Path, overrides: list[str]) -> list[str]:
    """Differences between the run's saved config and what conf_dir composes with the same overrides today
    (a default changed since, a key added or removed). Both unresolved: interpolations compare as written."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml"), resolve=False)
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        current = OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=False)
    return config_differences(saved, current)
