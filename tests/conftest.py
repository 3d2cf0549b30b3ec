"""Shared fixtures: composing configs with Hydra's compose API, and a sample dataset prepared once."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import gptlab  # noqa: F401  (registers the config schemas)
from gptlab.errors import composition_error
from gptlab.launch import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"

register_resolvers()  # as every entry point does before Hydra composes conf/
os.environ["WANDB_MODE"] = "offline"  # never reach for the network, whatever a config says
os.environ.setdefault("WANDB_SILENT", "true")


def compose_root(root: str, overrides: list[str] = (), output_dir: Path | None = None) -> DictConfig:
    """The config `python scripts/<script>.py <overrides>` would get from conf/<root>.yaml, without Hydra's own
    node. A mistake Hydra finds while composing (an unknown key, a value of the wrong type) raises the ConfigError
    the script would report."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        try:
            cfg = compose(config_name=root, overrides=list(overrides))
        except Exception as e:
            raise composition_error(e) or e from e
    if "paths" in cfg:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or "/nonexistent/run")  # Hydra's run folder: a running script's
    return cfg


def compose_train(
    overrides: list[str] = (), output_dir: Path | None = None, data_dir: Path | None = None
) -> DictConfig:
    cfg = compose_root("train", overrides, output_dir)
    if data_dir is not None:
        with open_dict(cfg):
            cfg.paths.data_dir = str(data_dir)
    return cfg


def run_script(script: str, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """python scripts/<script> <overrides>, as a user runs it (GPTLAB_ROOT pointing at this checkout)."""
    env = dict(os.environ, GPTLAB_ROOT=str(ROOT))
    command = [sys.executable, str(ROOT / "scripts" / script), *overrides]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def kill_once(cmd: list[str], env: dict, cwd: Path, target: Path, timeout: float = 300) -> int:
    """Run `cmd`, SIGKILL it as soon as `target` exists (a step's checkpoint, say); its return code."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert target.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode


def wait_for(condition, timeout: float = 120, every: float = 0.1) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass; its last value. For files another process writes
    in its own time (W&B's service): a busy machine delays them, and a test must not race them."""
    deadline = time.monotonic() + timeout
    while not (held := condition()) and time.monotonic() < deadline:
        time.sleep(every)
    return held


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order (a line cut short fails the test)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def script_schemas() -> dict[str, type]:
    """conf/<root>.yaml -> the schema of that script's config (registered where it lives: modules that load torch)."""
    from gptlab.eval.harness import EvalHarnessConfig
    from gptlab.eval.hellaswag import EvalHellaSwagConfig
    from gptlab.generate import SampleConfig
    from gptlab.hf import ExportHFConfig

    return {
        "sample": SampleConfig, "eval_hellaswag": EvalHellaSwagConfig, "eval_harness": EvalHarnessConfig,
        "export_hf": ExportHFConfig,
    }  # fmt: skip


@pytest.fixture
def one_thread():
    """Tiny models run many times faster on one thread than on two that spin-wait for a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data folder holding the prepared built-in corpora, sample and sample_code (prepared once per session)."""
    from gptlab.data.config import DataConfig, PrepareConfig
    from gptlab.data.prepare import prepare_dataset

    folder = tmp_path_factory.mktemp("data")
    for name in ("sample", "sample_code"):
        corpus = DataConfig(name=name, source="stdlib", dir=str(folder / name), val_fraction=0.05)
        prepare_dataset(dataclasses.replace(corpus, prepare=PrepareConfig(workers=1)))
    return folder


@pytest.fixture(scope="session")
def sample_docs() -> list[tuple[str, str]]:
    from gptlab.data.sample_corpus import sample_documents

    return sample_documents()


@pytest.fixture(scope="session")
def code_docs() -> list[tuple[str, str]]:
    from gptlab.data.sample_corpus import code_documents

    return code_documents()


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own gpt2 encoding, offline, from a copy of the shared cache (tiktoken may rewrite its cache)."""
    import tiktoken

    cache = tmp_path_factory.mktemp("tiktoken_cache")
    shutil.copytree(SHARED / "tiktoken_cache", cache, dirs_exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    mp.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding cached from elsewhere
    yield tiktoken.get_encoding("gpt2")
    mp.undo()
