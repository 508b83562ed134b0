"""attnlab's errors: one base class, ``AttnlabError``, for every problem a user can fix.

Each message names what is wrong (the file and field, the flag, the setting) and how to fix it.
The command line prints them as one line and exits non-zero; a traceback appears only with
``attnlab --debug``. The classes also derive from ``ValueError`` where the problem is a bad value,
so code that catches ``ValueError`` keeps working.

This module sits below every layer of the package and imports nothing from it.
"""

from __future__ import annotations

__all__ = ["AttnlabError", "ConfigError", "DataError", "CheckpointError", "RunDirectoryError", "TrainingInterrupted"]


class AttnlabError(Exception):
    """Base class of the errors attnlab raises on purpose, with a message meant for the user."""


class ConfigError(AttnlabError, ValueError):
    """A setting, flag or argument with a value attnlab cannot use."""


class DataError(AttnlabError, ValueError):
    """A corpus or text that is missing, unreadable, not UTF-8, empty or misaligned."""


class CheckpointError(AttnlabError, ValueError):
    """A checkpoint or run file that is missing, incomplete, corrupted or not attnlab's."""


class RunDirectoryError(AttnlabError):
    """A run directory that cannot be written, or that another process is writing."""


class TrainingInterrupted(AttnlabError):
    """Training stopped on SIGINT or SIGTERM after writing a resumable checkpoint."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
