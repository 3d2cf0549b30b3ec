"""Errors in what the user gave gptlab (config values, data files): reported in one line, no traceback."""

import errno
import functools
import os
import sys
from collections.abc import Callable


class UserInputError(Exception):
    label = "Error"  # how the entry points introduce the message
    status = "failed"  # summary.json's status for a run that ends with this error


class ConfigError(UserInputError, ValueError):
    """A user mistake in the config: `key` is the dotted path of the offending value."""

    label = "Config error"
    status = "config_error"

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


class DataError(UserInputError):
    """A data or tokenizer file that is missing, damaged or inconsistent with the config."""

    label = "Data error"


class DiskError(UserInputError):
    """The file system refused a write (full, over quota, read-only, no permission): nothing is half-written.
    Its message begins with the OS's own words, e.g. "No space left on device"."""

    label = "Disk error"
    errnos = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # the OSErrors it stands for


class Preempted(SystemExit):
    """The run stopped at a signal (SIGTERM, SIGUSR1) after saving a checkpoint: exit status 128 + the signal's
    number, as if the signal had killed it, so that a requeue policy sees it; `ckpt_path=auto` resumes it."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


def exit_on_user_error(entry_point: Callable) -> Callable:
    """For scripts: a UserInputError becomes one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(entry_point)
    def run(*args, **kwargs):
        try:
            return entry_point(*args, **kwargs)
        except UserInputError as e:
            print(f"{e.label}: {e}", file=sys.stderr)
            sys.exit(2)

    return run


def exit_on_config_error(hydra_main: Callable) -> Callable:
    """For @hydra.main entry points: a mistake Hydra finds while composing the config (an unknown key or option,
    a value of the wrong type, a malformed override) ends as one line and exit status 2, like a ConfigError the
    task raises, instead of Hydra's several-line report. HYDRA_FULL_ERROR=1 (Hydra's public switch) makes Hydra
    raise the error rather than print it; set by the user, it keeps Hydra's full report. A run folder Hydra cannot
    write before the task starts (read-only, full) is one line too (setup_error).
    Also registers the resolvers conf/hydra/ names folders with (gptlab.launch.register_resolvers)."""

    @functools.wraps(hydra_main)
    def run(*args, **kwargs):
        from gptlab.launch import register_resolvers

        register_resolvers()
        users_choice = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return hydra_main(*args, **kwargs)
        except Exception as e:
            error = None if users_choice else composition_error(e) or setup_error(e)
            if error is None:
                raise
            print(f"{error.label}: {error}", file=sys.stderr)
            sys.exit(2)
        finally:
            if users_choice is None:
                os.environ.pop("HYDRA_FULL_ERROR", None)

    return run


def composition_error(e: Exception) -> ConfigError | None:
    """Hydra's composition error as a ConfigError naming the key, by the exception's type; None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from gptlab.schema import config_error

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        return ConfigError(group, f"unknown option {name!r} (no conf/{e.missing_cfg_file}.yaml); "
                                  f"choose one of: {', '.join(e.options or [])}")  # fmt: skip
    if isinstance(e, ConfigCompositionException) and isinstance(e.__cause__, OmegaConfBaseException):
        return config_error(e.__cause__)
    if isinstance(e, (ConfigCompositionException, OverrideParseException, MissingConfigException)):
        return ConfigError("command line", str(e).strip().splitlines()[0])
    return None


def setup_error(e: Exception) -> DiskError | None:
    """An OSError Hydra meets while it prepares the run folder, before the task starts (creating the folder,
    opening its log file: logging.config wraps that in a ValueError) as a DiskError naming the file; None for
    anything else, and for any error of the task itself, which keeps its traceback."""
    os_error = e if isinstance(e, OSError) else e.__cause__
    if not isinstance(os_error, OSError) or os_error.errno not in DiskError.errnos or _raised_in_task(e):
        return None
    return DiskError(f"{os_error.strerror or os_error}: cannot write {os_error.filename}, in the run folder Hydra "
                     "prepares (hydra.run.dir, or hydra.sweep.dir for a multirun)")  # fmt: skip


def _raised_in_task(e: Exception) -> bool:
    """Did `e` pass through a task wrapped by exit_on_user_error (one of its frames runs that wrapper's code)?"""
    wrapper = exit_on_user_error(print).__code__  # the same code object for every wrapped function
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is wrapper:
            return True
        tb = tb.tb_next
    return False
