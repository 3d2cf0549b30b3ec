"""Errors in what the user gave gptlab (config values, data files): reported in one line, no traceback."""


class UserInputError(Exception):
    label = "Error"  # how the entry points introduce the message


class DataError(UserInputError):
    """A data or tokenizer file that is missing, damaged or inconsistent with the config."""

    label = "Data error"
