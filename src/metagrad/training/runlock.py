"""One process per run folder: an OS lock on ``RUN_DIR/.lock`` while a process trains or evaluates there.

The lock is ``fcntl.flock`` on the file: the kernel releases it when its holder exits, however it
ends (``kill -9`` included), so a stale lock file never blocks a later run. The file holds the
holder's PID and command, which a refused process names in its error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from metagrad.data import _io
from metagrad.errors import FileError, MetagradError, describe_os_error

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second process
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolderInUse", "lock_run_dir"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_ATTEMPTS = 5  # a holder may delete the file between our open and our lock: try again with a new one


class RunFolderInUse(MetagradError):
    """Another process trains or evaluates in the run folder."""


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, command: str, *, create: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block.

    Args:
        run_dir: the run folder.
        command: what this process does there (``"train"``, ``"eval"``), shown to a refused process.
        create: create the folder (and its parents) when missing; the block's failure then removes the
            folders it created if they hold nothing else.

    Raises:
        RunFolderInUse: another live process holds the lock (the message names its PID).
        FileError: the folder cannot be created.
    """
    created = _io.missing_folders(run_dir) if create else []
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileError(describe_os_error(exc, "create the run folder", run_dir)) from None
    path = run_dir / LOCK_NAME
    fd = _acquire(path, command)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before the release: a waiting process then sees a new file
            os.close(fd)
        _io.remove_if_empty(created)


def _acquire(path: Path, command: str) -> int | None:
    """The locked file's descriptor, or None where no lock can be taken (a read-only folder, Windows)."""
    if fcntl is None:
        return None
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link: replace it rather than write the PID where it points
                logger.warning("%s was a symbolic link; replacing it by the lock file", path)
                _remove_link(path)
                continue
            if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                # Nothing can be written there, by us or by another metagrad: there is nothing to guard.
                logger.debug("no lock in %s (%s)", path.parent, exc.strerror)
                return None
            raise FileError(describe_os_error(exc, "create the lock file", path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                logger.warning("cannot lock %s (%s): nothing stops a second process from using the folder "
                               "at the same time", path, exc.strerror)
                return None
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FileError(describe_os_error(exc, "lock", path)) from None
            raise RunFolderInUse(
                f"{path.parent} is in use by {holder} (it holds {path}); wait for it to end or stop it, "
                "or use another run folder"
            ) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {command}\n".encode())
            return fd
        os.close(fd)  # the holder removed this file as it ended: lock the new one
    raise FileError(f"cannot lock {path}: it keeps being replaced; is another program removing it?")


def _remove_link(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FileError(describe_os_error(exc, "replace the symbolic link", path)) from None


def _holder(fd: int) -> str:
    try:
        pid, _, command = os.pread(fd, 200, 0).decode("utf-8", "replace").strip().partition(" ")
    except OSError:
        pid, command = "", ""
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" (metagrad {command})" if command else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
