"""Exceptions raised for bad user input. The CLI prints their message (no traceback) and exits non-zero."""

from __future__ import annotations

import errno
import os
from typing import Any


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


class FileError(MetagradError):
    """A file or folder cannot be read or written (full disk, read-only folder, permission, missing
    folder), or a run file is damaged. The message names the file, the cause and the fix."""

    exit_code = 1


class ResultNotSaved(FileError):
    """A result was computed but its file could not be written: the CLI prints ``result`` first."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


# errno -> what the user can do about it
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EFBIG: "the file is larger than this file system or your file-size limit allows",
    errno.EROFS: "the file system is read-only: use a writable folder",
    errno.EACCES: "permission denied: change the permissions or use a folder you can write to",
    errno.EPERM: "operation not permitted: change the permissions or use another folder",
    errno.ENOENT: "it does not exist: check the path (create a missing folder first)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EIO: "input/output error: the disk or network file system failed",
    errno.ELOOP: "it is a symbolic link, which metagrad does not write through (a run writes only inside its "
                 "folder): replace the link by a copy of the file it points to",
}


def describe_os_error(exc: OSError, action: str, path: str | os.PathLike[str] | None = None) -> str:
    """One line for a failed read or write: ``cannot write /run/x: No space left on device (the disk...)``.

    Args:
        exc: the error; its own file name is used when ``path`` is None.
        action: what was attempted, e.g. ``"write"``, ``"read"``, ``"create the folder"``.
        path: the file or folder concerned.
    """
    where = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0)
    what = f"{action} {where}" if where is not None else action
    return f"cannot {what}: {reason}" + (f" ({fix})" if fix and fix not in reason else "")
