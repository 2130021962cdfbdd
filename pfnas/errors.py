"""The exceptions pfnas raises for its users: one family under :class:`PfnasError`.

The CLI prints a PfnasError's message on one line and exits with code 2; anything else is a bug.
"""
from __future__ import annotations


class PfnasError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class ConfigError(PfnasError):
    """Invalid configuration field or value."""


class DataError(PfnasError):
    """Missing or malformed data set."""


class ModelError(PfnasError):
    """Unknown model name or unreadable checkpoint."""


class TrainingError(PfnasError):
    """Training diverged (NaN/inf loss) or ran out of memory.

    ``deterministic``: rerunning the same config fails the same way (a non-finite loss), so retrying is useless.
    """

    def __init__(self, message: str = "", deterministic: bool = False):
        super().__init__(message)
        self.deterministic = deterministic

    def __reduce__(self):
        return type(self), (str(self), self.deterministic)


class StudyError(PfnasError):
    """A study that ended without a result: every trial failed, so nothing was selected."""


class RunDirError(PfnasError):
    """An output folder that holds another configuration's run, or is in use by another process."""


class BadNameError(ConfigError, ValueError):
    """A name that becomes a folder (study, experiment, task, run) but could leave its parent folder. A ValueError
    too, so a pydantic validator reports it as the field's own message."""


class RunFileError(PfnasError):
    """A run file that cannot be written (disk full) or read back (truncated, changed, or not plain data)."""
