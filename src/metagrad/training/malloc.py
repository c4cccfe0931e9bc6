"""Keep freed memory in the process for reuse, instead of handing it back to the OS after every step.

On Linux, glibc's ``malloc`` serves every block above a threshold (at most 32 MB) with a fresh ``mmap``
and unmaps it when freed, and trims the top of its heap once more than 128 KB there is free. A
meta-training step allocates and frees the same large activations every iteration, so without this
each one is faulted in (and zeroed by the kernel) page by page again: on Mini-ImageNet the step was
bound by page faults. With ``mmap`` off and the trim threshold at its maximum, the heap grows to the
step's peak over the first steps and later steps reuse it, for some more peak memory from
fragmentation (measurements in docs/PERFORMANCE.md, "The C allocator").

This is what glibc's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` environment variables do
(``GLIBC_ENV``); the ``metagrad train``, ``eval`` and ``bench`` commands call :func:`keep_freed_memory`
on start-up. A library user who wants it calls it once; importing metagrad changes nothing.
``METAGRAD_MALLOC=default`` in the environment turns it off for the commands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["ENV_VAR", "GLIBC_ENV", "glibc", "keep_freed_memory", "requested"]

logger = logging.getLogger(__name__)

ENV_VAR = "METAGRAD_MALLOC"
"""``default`` leaves the C allocator as it is; anything else (or unset) lets the commands tune it."""

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int

GLIBC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_MAX)}
"""The same setting in glibc's environment variables, for a process that does not call this module
(``benchmarks/compare_learn2learn.py --l2l-malloc keep`` gives it to learn2learn)."""


def requested() -> bool:
    """False when ``METAGRAD_MALLOC=default`` asks to leave the C allocator alone."""
    return os.environ.get(ENV_VAR, "").strip().lower() != "default"


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (whose ``mallopt`` parameters are used here), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no ``mmap`` per block, no trimming).

    Returns:
        True if the setting was applied; False elsewhere (not Linux, not glibc: musl has no
        ``mallopt``) or when ``METAGRAD_MALLOC=default``. Never raises.
    """
    if not requested():
        logger.debug("%s=default: the C allocator is left as it is", ENV_VAR)
        return False
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_MAX) == 1
    logger.debug("malloc keeps freed memory: %s", applied)
    return applied
