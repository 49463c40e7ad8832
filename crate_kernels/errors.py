"""The exceptions every layer may raise (the one module all layers import; it imports nothing of the package).

Each is an error meant for the user: the commands print its message as one line, without a traceback, and exit 1
(2 for ``ConfigError``; 128 + the signal for ``StopRequested``, a run stopped by a signal; see
``pipeline.flags.command_main``). ``TrainError`` is the general one: a checkpoint that cannot be read or does not
fit the model, a run that cannot go on; the models raise it too, not only training.
"""
from __future__ import annotations


class TrainError(RuntimeError):
    """A failure reported to the user as one message (no traceback)."""


class ConfigError(ValueError):
    """An invalid flag or config value; the message names the flag."""


class DatasetError(RuntimeError):
    """A dataset that cannot be found, read, or used; the message names the path."""


class UnreadableImage(DatasetError):
    """One image file that fails to open or decode (``path``, ``reason``)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable across data-loading worker processes
        return type(self), (self.path, self.reason)


class StopRequested(Exception):
    """SIGTERM (a scheduler's preemption, ``kill``) or SIGINT (Ctrl-C) arrived: the run saved its state and stopped."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
