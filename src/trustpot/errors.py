"""Exceptions with messages a user can act on.

Every error that bad input can cause is one of these; the command line prints the message
on one line and writes the traceback to ``error.log`` in the run directory.
"""

from __future__ import annotations


class TrustpotError(Exception):
    """Base class of all errors trustpot raises on purpose."""


class ConfigError(TrustpotError):
    """An option is unknown, has the wrong type, or cannot be honoured by the run."""


class DataError(TrustpotError):
    """A data file is missing, unreadable or holds invalid values.

    Args:
        path: the file.
        message: what is wrong.
        frame: index of the frame (0-based) in the file, when one frame is at fault.
        field: the name of the field at fault (``energy``, ``forces``, ``positions``...).
    """

    def __init__(
        self, path: str, message: str, frame: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.frame = frame
        self.field = field
        self.reason = message
        where = self.path
        if frame is not None:
            where += f": frame {frame}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class CheckpointError(TrustpotError):
    """A checkpoint is missing, from an incompatible version, tampered with or malformed."""


class TrainingError(TrustpotError):
    """Training cannot go on (e.g. the loss became NaN, or a checkpoint holds no training
    state to resume from)."""
