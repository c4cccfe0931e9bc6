"""Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

PyTorch's CPU kernels run on OpenMP (libgomp in the Linux wheels). Between parallel regions libgomp's
default is to spin for a while before sleeping, which costs nothing on idle cores and a great deal when
the process gets less CPU than it has threads: a thread spins on a core that its sibling needs, and
every one of the thousands of small kernels in a MAML step waits for the scheduler. Measured on the
2-core development machine with ``benchmarks/bench_threads.py`` (``omniglot-maml-5w1s``, torch's default
2 threads): beside one single-thread process started from another terminal (Linux's autogroup
scheduling shares the cores between sessions, half and half), 28.4 s per iteration with libgomp's
default policy, 0.58 s with ``PASSIVE`` and 0.50 s with one thread; on idle cores 0.37 s with the
default, 0.47 s with ``PASSIVE``. Passive waiting gives up about a quarter on idle cores to avoid a
50-fold loss on shared ones. On 16 cores (Intel Xeon, torch 2.11) the trade is larger both ways: idle,
0.26 s with the default against 0.45 s with ``PASSIVE``; beside one single-thread process, no iteration
in 15 s with the default against 0.52 s.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so this module runs first in
``metagrad/__init__.py``: importing metagrad before torch sets ``OMP_WAIT_POLICY=PASSIVE`` unless
the variable is already set: on cores of your own, ``OMP_WAIT_POLICY=ACTIVE`` spins always and
``GOMP_SPINCOUNT=300000`` restores libgomp's default (spin a while, then sleep). With torch already
imported it changes nothing, since the setting could no longer take effect. The policy decides only how
waiting threads wait: results are the same bit for bit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Container, MutableMapping

POLICY = "PASSIVE"
"""The wait policy metagrad prefers for its own processes."""


def prefer_passive_wait(environ: MutableMapping[str, str] = os.environ,
                        modules: Container[str] = sys.modules) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` if it is unset and torch is not in ``modules``.

    Returns:
        ``"set"`` (set here), ``"user"`` (already set: left as it is) or ``"torch first"`` (unset, but
        torch was imported before metagrad: left unset, libgomp's default spinning applies).
    """
    if "OMP_WAIT_POLICY" in environ:
        return "user"
    if "torch" in modules:
        return "torch first"
    environ["OMP_WAIT_POLICY"] = POLICY
    return "set"


STATUS = prefer_passive_wait()
"""What happened when metagrad was imported: ``"set"``, ``"user"`` or ``"torch first"``."""


def spinning_warning(device_type: str, threads: int, status: str | None = None) -> str | None:
    """The warning for a CPU run whose idle threads spin because torch was imported first, else None."""
    status = STATUS if status is None else status
    if device_type != "cpu" or threads <= 1 or status != "torch first":
        return None
    return (f"torch was imported before metagrad, so its {threads} OpenMP threads spin while they wait: "
            "beside other work on the machine this can be 50x slower (README, 'CPU threads'). Import "
            "metagrad before torch, or start Python with OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1.")
