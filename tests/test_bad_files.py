"""Bad files and folders end in one line naming the file and what is wrong, and write nothing: damaged or mismatched
checkpoints (eval, sample, export), a full disk during a save, a run folder that cannot be written, an accelerator
the machine lacks, an export into a folder that holds files."""

import dataclasses
import errno
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from gptlab.checkpoint_file import read_checkpoint
from gptlab.config import CHECKPOINTS_DIR, load_config
from gptlab.errors import ConfigError, DataError, DiskError, exit_on_user_error, setup_error
from gptlab.files import atomic_open
from gptlab.model import GPT, GPTConfig
from gptlab.model_config import gpt_config_record
from gptlab.pretrained import load_gpt
from tests.conftest import ROOT, compose_train, run_script

TINY = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)  # a model config gptlab accepts


def save_gpt(path, config: GPTConfig = TINY, weights_of: GPTConfig | None = None) -> None:
    """A checkpoint laid out as scripts/train.py writes it: the model config's record, the weights under `model.`;
    weights_of: the weights of a GPT of another config (a mixed-up checkpoint)."""
    state = {f"model.{k}": v for k, v in GPT(weights_of or config).state_dict().items()}
    torch.save({"gpt_config": gpt_config_record(config), "state_dict": state}, path)


# --- damaged checkpoint files ---------------------------------------------------------------------------------


def damaged(tmp_path, kind: str):
    path = tmp_path / f"{kind}.ckpt"
    save_gpt(tmp_path / "whole.ckpt")
    whole = (tmp_path / "whole.ckpt").read_bytes()
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    else:
        path.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "random": os.urandom(4000)}[kind])
    return path


DAMAGED = {
    "empty": "is empty",
    "truncated": r"is truncated or damaged \(not a whole torch.save archive\)",
    "random": "is not a PyTorch checkpoint",
    "zip": "is a zip archive, but not a PyTorch checkpoint",
}


@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_checkpoint_is_named_with_what_is_wrong(tmp_path, kind):
    """torch.load says EOFError, "internal miniz error" or an unpickling error; mmap=True (the resume path's) says
    "mmap can only be used with files saved with ..." for any of them."""
    path = damaged(tmp_path, kind)
    for load in (load_gpt, lambda p: read_checkpoint(p, mmap=True, map_location="cpu")):
        with pytest.raises(DataError, match=f"^{path} {DAMAGED[kind]}") as error:
            load(path)
        assert "\n" not in str(error.value)


def test_read_checkpoint_reads_what_torch_save_writes(tmp_path):
    """Both formats, mmap or not; a file that holds no dict, or an object weights_only refuses, is named."""
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(read_checkpoint(tmp_path / name, mmap=True, map_location="cpu")["w"], torch.ones(2))
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    with pytest.raises(DataError, match="tensor.pt holds a Tensor, not a checkpoint"):
        read_checkpoint(tmp_path / "tensor.pt")
    torch.save({"callable": zipfile.ZipFile}, tmp_path / "pickled.pt")
    with pytest.raises(DataError, match=r"pickled.pt is not loadable with weights_only=True: it holds a zipfile"):
        read_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(DataError, match="cannot read the checkpoint .*missing.pt: No such file"):
        read_checkpoint(tmp_path / "missing.pt")


# --- weights that do not match their model config ----------------------------------------------------------------

MISMATCHES = {  # the checkpoint's weights -> the first difference named
    "more layers": (dict(n_layer=2), r"tensor transformer.h.1.ln_1.weight is not in the config's model \(and 11 more"),
    "fewer layers": (dict(n_layer=0), r"no tensor transformer.h.0.ln_1.weight \(and 11 more\)"),
    "other shape": (dict(n_embd=16), r"tensor transformer.wte.weight has shape \[50304, 16\], where the config's "
                                     r"model has \[50304, 8\]"),
}  # fmt: skip


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_weights_that_do_not_match_the_config_name_the_first_tensor(tmp_path, mismatch):
    weights_of, message = MISMATCHES[mismatch]
    save_gpt(tmp_path / "mixed.ckpt", TINY, dataclasses.replace(TINY, **weights_of))
    with pytest.raises(DataError, match=f"^{tmp_path / 'mixed.ckpt'}: its weights do not match .*n_layer=1.*{message}"):
        load_gpt(tmp_path / "mixed.ckpt")


def test_a_sharded_checkpoint_with_other_weights_is_named(tmp_path):
    """dcp.load reads only the tensors it is given: without the check, extra layers in the shards pass silently."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_000002.ckpt"
    state = {f"model.{k}": v for k, v in GPT(dataclasses.replace(TINY, n_layer=2)).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    torch.save({"gpt_config": gpt_config_record(TINY)}, folder / "meta.pt")
    with pytest.raises(DataError, match=r"step_000002.ckpt: its weights .*transformer.h.1.ln_1.weight is not in"):
        load_gpt(folder)
    (folder / "meta.pt").write_bytes(b"")
    with pytest.raises(DataError, match=r"meta.pt is empty"):
        load_gpt(folder)


# --- a full disk ------------------------------------------------------------------------------------------------


class FullDisk:
    """A file on a file system that fills up after `room` bytes: a write past it fails as the OS fails it. Through
    it torch.save raises what it raises on a real full disk (measured on a 1 MB tmpfs): RuntimeError("[enforce
    fail at inline_container.cc:672] . unexpected pos ..."), raised while handling the write's OSError(ENOSPC)."""

    def __init__(self, f, room: int, code: int = errno.ENOSPC):
        self.f, self.room, self.code = f, room, code

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_the_previous_file(tmp_path, code):
    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    path.write_bytes(b"the previous checkpoint")
    with pytest.raises(DiskError) as error:
        with atomic_open(path) as f:
            torch.save({"w": torch.zeros(1 << 14)}, FullDisk(f, room=1000, code=code))
    assert str(error.value).startswith(f"{os.strerror(code)} while writing {path} (")
    assert str(error.value).endswith("MB free on that filesystem); the previous file is unchanged")
    assert path.read_bytes() == b"the previous checkpoint"
    assert os.listdir(path.parent) == ["last.ckpt"]  # the temporary file is gone


def test_other_errors_during_a_save_pass_unchanged(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_open(tmp_path / "x.bin") as f:
            f.write(b"part")
            raise ValueError("a bug")
    assert os.listdir(tmp_path) == []


# --- the run folder and the accelerator, before training ---------------------------------------------------------


@pytest.fixture(scope="module")
def train_cfg():
    return load_config(compose_train(["trainer.accelerator=cpu"]))[0]


def read_only(folder, monkeypatch) -> None:
    """Make `folder` refuse new files. chmod binds everyone but root (root passes permission bits), so as root the
    probe's file creation in it fails as the OS would fail it for anyone else."""
    from gptlab import preflight

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    real = preflight.tempfile.NamedTemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "NamedTemporaryFile", refuse)


@pytest.mark.parametrize("where", ["run folder", "checkpoints"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, train_cfg, where):
    from gptlab.preflight import check_run

    run_dir = tmp_path / "run"
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True)
    check_run(train_cfg, run_dir)  # writable: passes, and leaves no probe behind
    assert [p.name for p in run_dir.iterdir()] == [CHECKPOINTS_DIR] and not any((run_dir / CHECKPOINTS_DIR).iterdir())
    folder = run_dir if where == "run folder" else run_dir / CHECKPOINTS_DIR
    read_only(folder, monkeypatch)
    try:
        with pytest.raises(DiskError, match=f"^Permission denied: cannot write in the run.* folder {folder}$"):
            check_run(train_cfg, run_dir)
    finally:
        folder.chmod(0o755)


def test_a_run_folder_to_create_is_checked_where_it_would_be_created(tmp_path, monkeypatch, train_cfg):
    from gptlab.preflight import check_run

    check_run(train_cfg, tmp_path / "runs" / "new")
    read_only(tmp_path, monkeypatch)
    try:
        with pytest.raises(DiskError, match=f"cannot create the run folder {tmp_path / 'runs' / 'new'} in {tmp_path}$"):
            check_run(train_cfg, tmp_path / "runs" / "new")
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "mps"])
def test_an_accelerator_the_machine_lacks_is_a_config_error(tmp_path, monkeypatch, train_cfg, accelerator):
    from gptlab.preflight import check_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = dataclasses.replace(train_cfg, trainer=dataclasses.replace(train_cfg.trainer, accelerator=accelerator))
    with pytest.raises(ConfigError, match=f"asked for {accelerator}, but this machine has no .*GPU") as error:
        check_run(cfg, tmp_path)
    assert error.value.key == "trainer.accelerator" and "trainer.accelerator=cpu or auto" in str(error.value)


def test_a_run_folder_hydra_cannot_write_is_one_line():
    """Hydra opens the run's log file before the task starts: logging.config wraps the OSError in a ValueError."""
    os_error = OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/run/train.log")
    try:
        raise ValueError("Unable to configure handler 'file'") from os_error
    except ValueError as e:
        assert str(setup_error(e)).startswith("Read-only file system: cannot write /ro/run/train.log")

    def task():
        raise os_error  # the same error raised by the task itself: a traceback, as any error of the task

    with pytest.raises(OSError) as raised:
        exit_on_user_error(task)()
    assert setup_error(raised.value) is None


# --- export_hf.py into a folder that holds files -----------------------------------------------------------------


def test_export_refuses_a_folder_with_files_unless_overwrite(tmp_path):
    from gptlab.hf import check_out

    check_out(tmp_path / "new", overwrite=False)
    check_out(tmp_path, overwrite=False)  # empty
    (tmp_path / "pytorch_model.bin").write_bytes(b"an older export")
    with pytest.raises(ConfigError, match="is not empty: pass overwrite=true") as error:
        check_out(tmp_path, overwrite=False)
    assert error.value.key == "out"
    check_out(tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_out(tmp_path / "pytorch_model.bin", overwrite=True)


def test_export_with_overwrite_replaces_the_folder_whole_or_not_at_all(tmp_path, monkeypatch):
    """Written beside the folder, then swapped in: a failed export leaves the old one. (export_hf itself, which
    writes a folder transformers loads, is tests/test_hf.py's; a stand-in writes here, in milliseconds.)"""
    from gptlab import hf

    def export(model, folder, vocab_size=None):
        if model is None:
            raise DataError("cannot export the model")
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"the new export")

    monkeypatch.setattr(hf, "export_hf", export)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"an older export")
    with pytest.raises(DataError, match="cannot export"):
        hf.export_hf_replacing(None, out)
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(out) == ["pytorch_model.bin"]  # as it was
    assert hf.export_hf_replacing(GPT(TINY), out) == out
    assert os.listdir(tmp_path) == ["hf"] and os.listdir(out) == ["model.safetensors"]


# --- the scripts --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_script_names_a_truncated_checkpoint(tmp_path):
    path = damaged(tmp_path, "truncated")
    result = run_script("sample.py", f"checkpoint={path}", "device=cpu", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"Data error: {path} is truncated or damaged (not a whole torch.save archive)"


@pytest.mark.slow
def test_train_script_refuses_a_gpu_the_machine_lacks_before_lightning(tmp_path):
    env = dict(os.environ, GPTLAB_ROOT=str(ROOT), WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")  # no GPU
    overrides = ["debug=smoke", "logger=none", "trainer.accelerator=gpu", f"hydra.run.dir={tmp_path / 'run'}"]
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"paths.data_dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Config error: trainer.accelerator: asked for gpu, but this machine has no GPU "
        "(torch.cuda.is_available() is False); use trainer.accelerator=cpu or auto"
    ]
    assert not (tmp_path / "run" / CHECKPOINTS_DIR).exists()
