"""What a training run shows on the console: gptlab's own lines, its progress bar, and little else.

gptlab's lines (the header, the result block, notes on the way) go through the `gptlab` logger, to the console as
they are and, through the root logger, to <run>/train.log (Hydra's file handler): the log holds what the console
showed. Chatter a user cannot act on stays out of the console but not out of the log: Lightning's device lines
(the header says the hardware), its checkpoint-loading notes and its LitLogger advert. A Python warning is one line,
"<Category>: <message>", without the source line Python prints under it.
"""

import logging
import sys
import warnings

LOGGER = logging.getLogger("gptlab")
CHATTER = (  # the starts of Lightning's console lines that are left to train.log
    "GPU available:", "TPU available:", "HPU available:", "💡 Tip:", "`weights_only` was not set",
    "`Trainer.fit` stopped:", "LOCAL_RANK:", "Restoring states from", "Restored all states from",
)  # fmt: skip


def say(text: str) -> None:
    """A gptlab line (or block) on the console and in train.log; the caller is rank 0."""
    _add_console(LOGGER, sys.stdout)
    LOGGER.setLevel(logging.INFO)
    LOGGER.info(text)


def quiet_console() -> None:
    """Set up the console as the module docstring says. Idempotent: every job of a multirun calls it."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:  # Lightning's own console handlers
            if not any(isinstance(f, _NoChatter) for f in handler.filters):
                handler.addFilter(_NoChatter())
    warnings.formatwarning = _one_line
    logging.captureWarnings(True)  # warnings -> the py.warnings logger -> the console (below) and train.log
    _add_console(logging.getLogger("py.warnings"), sys.stderr)


def _add_console(logger: logging.Logger, stream) -> None:
    if not any(isinstance(h, _Console) for h in logger.handlers):
        logger.addHandler(_Console(stream))


class _Console(logging.StreamHandler):
    """The message alone, to sys.stdout or sys.stderr as they are when it is written (not when the handler was
    made: tests and notebooks replace them)."""

    def __init__(self, stream):
        self._stream_name = "stdout" if stream is sys.stdout else "stderr"
        super().__init__(stream)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _NoChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(CHATTER)


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}"
