"""The C allocator of the ``metagrad`` train, eval and bench commands: freed blocks kept, or large ones
mapped on huge pages.

On Linux, glibc's ``malloc`` serves every block above a threshold (at most 32 MB) with a fresh ``mmap``
that the kernel faults in and zeroes page by page, and unmaps it when freed. A meta-training step
allocates and frees the same large activations every iteration: on Mini-ImageNet (68 MB each) the step
was bound by those page faults. Two remedies, measured in docs/PERFORMANCE.md ("The C allocator"):

* ``keep`` (the default): no ``mmap`` and no trimming, so the heap grows to the step's peak once and is
  reused. The fastest, but glibc never compacts its heap: on Mini-ImageNet it grows to 1.5x the step's
  live bytes.
* ``huge``: blocks of :data:`LARGE_BLOCK` and more are mapped afresh on 2 MB transparent huge pages (one
  page fault per 2 MB instead of per 4 KB) and leave no holes in the heap; smaller ones are kept. On
  Mini-ImageNet 8% less peak memory at 0.75x the speed; on Omniglot 21-98 MB more and a mixed speed
  (one config 0.87x, another 1.18x), as torch's huge-page advice also lands on the heap's middle-sized
  blocks. Where huge pages are off, ``keep``.

PyTorch advises huge pages for its large CPU blocks only when ``THP_MEM_ALLOC_ENABLE=1`` is in the
environment at its first allocation, so the command's entry point (``metagrad/__main__.py``) calls
:func:`request_huge_pages` before anything imports torch, and :func:`tune` once the command is known.
This module imports nothing of torch; importing metagrad changes nothing. ``METAGRAD_MALLOC`` chooses:
unset or ``keep``, ``huge``, or ``default`` to leave glibc alone. Measured in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Container, Mapping, MutableMapping
from pathlib import Path

__all__ = ["ENV_VAR", "GLIBC_KEEP_ENV", "LARGE_BLOCK", "MODES", "SYSFS_THP", "THP_VARIABLE", "applied",
           "command_mode", "glibc", "huge_pages_for_torch", "kernel_thp_mode", "mode", "request_huge_pages",
           "tune"]

logger = logging.getLogger("metagrad")

ENV_VAR = "METAGRAD_MALLOC"
"""Unset or ``keep`` to keep every freed block, ``huge`` for large blocks on huge pages, ``default`` for
glibc's own behaviour."""

MODES = ("keep", "huge", "default")
"""What :func:`tune` can apply: every block kept, large blocks mapped on huge pages, glibc left alone."""

LARGE_BLOCK = 16 * 2**20
"""Blocks of at least this many bytes are mapped on their own in the ``huge`` mode (glibc allows 32 MB
at most); below it, a step's many small and middle-sized blocks are reused from the heap."""

THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch (c10's CPU allocator): 2 MB alignment and ``madvise(MADV_HUGEPAGE)`` for blocks of 2 MB
and more; read once, at torch's first allocation."""

SYSFS_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
"""The kernel's huge-page policy: ``always``, ``madvise`` (advised memory only) or ``never``, chosen in []."""

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int

_applied: str | None = None  # what tune() last applied in this process

GLIBC_KEEP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_MAX)}
"""The ``keep`` mode in glibc's environment variables, for a process that does not call this module
(``benchmarks/compare_learn2learn.py --l2l-malloc keep`` gives it to learn2learn)."""


def kernel_thp_mode(path: Path = SYSFS_THP) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``); None where unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_for_torch(environ: Mapping[str, str] = os.environ, path: Path = SYSFS_THP) -> bool:
    """Whether torch's large CPU blocks get huge pages: the kernel backs all memory with them, or it backs
    advised memory and torch advises (``THP_MEM_ALLOC_ENABLE`` set before torch loaded)."""
    thp = kernel_thp_mode(path)
    return thp == "always" or (thp == "madvise" and environ.get(THP_VARIABLE, "").strip() not in ("", "0"))


def _asked(environ: Mapping[str, str]) -> str:
    return environ.get(ENV_VAR, "").strip().lower()


def mode(environ: Mapping[str, str] = os.environ, path: Path = SYSFS_THP) -> str:
    """The setting :func:`tune` applies: one of :data:`MODES`, from ``METAGRAD_MALLOC`` and the kernel."""
    asked = _asked(environ)
    if asked in ("", "keep", "default"):
        return asked or "keep"
    if asked != "huge":
        logger.warning("%s=%r is not a setting (keep, huge or default); keeping freed memory", ENV_VAR, asked)
        return "keep"
    if huge_pages_for_torch(environ, path):
        return "huge"
    logger.warning("%s=huge: torch's blocks get no huge pages here (kernel mode %s, %s=%r); keeping freed "
                   "memory instead", ENV_VAR, kernel_thp_mode(path), THP_VARIABLE, environ.get(THP_VARIABLE))
    return "keep"


def request_huge_pages(environ: MutableMapping[str, str] = os.environ, modules: Container[str] = sys.modules,
                       path: Path = SYSFS_THP) -> dict[str, str]:
    """Put ``THP_MEM_ALLOC_ENABLE=1`` in ``environ`` for ``METAGRAD_MALLOC=huge``, where that gives torch's
    large blocks huge pages.

    Returns:
        The variables set here; empty for another setting, when the user set the variable, the kernel's
        mode is not ``madvise`` (``always`` needs no advice, ``never`` ignores it), or torch is loaded.
    """
    if (_asked(environ) != "huge" or THP_VARIABLE in environ or "torch" in modules
            or kernel_thp_mode(path) != "madvise"):
        return {}
    environ[THP_VARIABLE] = "1"
    return {THP_VARIABLE: "1"}


def command_mode(environ: Mapping[str, str] = os.environ, path: Path = SYSFS_THP) -> str:
    """The setting a ``metagrad`` command started with ``environ`` applies (after requesting huge pages)."""
    started = dict(environ)
    request_huge_pages(started, modules=(), path=path)
    return mode(started, path)


def glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc (whose ``mallopt`` parameters are used here), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def applied() -> str | None:
    """The setting :func:`tune` applied in this process (``"keep"``, ``"huge"``), None if none was."""
    return _applied


def tune(setting: str | None = None) -> str | None:
    """Apply ``setting`` (default: :func:`mode`) to glibc's malloc; return what was applied.

    Returns:
        ``"huge"`` or ``"keep"`` when applied; None for ``default``, off glibc (musl has no ``mallopt``)
        or if glibc refused.

    Raises:
        ValueError: ``setting`` is not one of :data:`MODES` (the environment's never is).
    """
    global _applied
    setting = setting or mode()
    if setting not in MODES:
        raise ValueError(f"setting {setting!r}: expected one of {', '.join(MODES)}")
    libc = glibc() if setting != "default" else None
    if libc is None:
        logger.debug("C allocator left as it is (%s)", setting)
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if setting == "keep":
        applied = mallopt(_M_MMAP_MAX, 0) == 1
    else:  # a fixed threshold also stops glibc from raising it as blocks are freed
        applied = mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK) == 1
    applied = applied and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_MAX) == 1
    logger.debug("C allocator %s: %s", setting, applied)
    _applied = setting if applied else _applied
    return setting if applied else None
