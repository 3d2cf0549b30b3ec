"""Errors in what the user gave gptlab (config values, data files): reported in one line, no traceback."""

import functools
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
        self.key = key


class DataError(UserInputError):
    """A data or tokenizer file that is missing, damaged or inconsistent with the config."""

    label = "Data error"


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
