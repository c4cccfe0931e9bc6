"""Exceptions raised for bad user input. The CLI prints their message (no traceback) and exits non-zero."""


class MetagradError(Exception):
    """Base class: something the user can fix. The message names the problem and the fix."""

    exit_code = 1


class ConfigError(MetagradError, ValueError):
    """A bad option, preset, config file or task shape (ways, shots, queries, rates...)."""

    exit_code = 2


class DataError(MetagradError):
    """Missing, corrupt or malformed dataset files, archives or caches."""

    exit_code = 1


class TrainingError(MetagradError):
    """Training cannot go on (for example a NaN or infinite loss)."""

    exit_code = 1
