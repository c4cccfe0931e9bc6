"""How idle OpenMP threads wait in the ``metagrad`` command: set before torch loads, never on import.

PyTorch's CPU kernels run on OpenMP (libgomp in the Linux wheels). libgomp's default lets a thread that
finished its share spin before it sleeps: fast on idle cores, but beside another busy process a spinning
thread holds the core its sibling needs, and a MAML step's thousands of small parallel regions each wait
for the scheduler (many-fold slower; measurements in docs/PERFORMANCE.md, "CPU threads").

libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when torch loads it, so the command's
entry point (``metagrad/__main__.py``) calls :func:`tune_wait` before anything imports torch. A
variable the user set wins; ``METAGRAD_OMP_WAIT=default`` leaves libgomp's default. The setting
decides only how waiting threads wait: results are the same bit for bit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Container, Mapping, MutableMapping

__all__ = ["ENV_VAR", "SETTING", "USER_VARIABLES", "requested", "spinning_warning", "tune_wait"]

ENV_VAR = "METAGRAD_OMP_WAIT"
"""``default`` keeps libgomp's own waiting; anything else (or unset) lets the command set :data:`SETTING`."""

SETTING = {"GOMP_SPINCOUNT": "1000"}
"""What the command (and ``metagrad.tune_process()``) sets: spin 1,000 times, then sleep. Decided once,
whatever else the machine runs: on 2 idle cores a step was 1.11x learn2learn's speed, and beside a busy
neighbour its worst step 1.75x the one-thread median, where libgomp's default stalls many-fold
(docs/PERFORMANCE.md, "CPU threads")."""

USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""libgomp's own variables: when either is set, the user has chosen and the command sets nothing."""


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``METAGRAD_OMP_WAIT=default`` asks to keep libgomp's default."""
    return environ.get(ENV_VAR, "").strip().lower() != "default"


def tune_wait(environ: MutableMapping[str, str] = os.environ,
              modules: Container[str] = sys.modules) -> dict[str, str]:
    """Put :data:`SETTING` in ``environ`` unless the user chose, or torch is already loaded.

    Returns:
        The variables set here; empty when the user set one of :data:`USER_VARIABLES`, asked for
        libgomp's default, or torch was already imported (libgomp has read its settings by then).
    """
    if not requested(environ) or any(name in environ for name in USER_VARIABLES) or "torch" in modules:
        return {}
    environ.update(SETTING)
    return dict(SETTING)


def spinning_warning(device_type: str, threads: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """The warning for a CPU run of several threads waiting as libgomp's default has them, else None: a
    process the ``metagrad`` command did not start (a script or notebook calling
    :func:`metagrad.training.run`) whose user set none of libgomp's variables nor called
    ``metagrad.tune_process()``."""
    if device_type != "cpu" or threads <= 1 or not requested(environ):
        return None
    if any(name in environ for name in USER_VARIABLES):
        return None
    return (f"this process's {threads} OpenMP threads spin while they wait (libgomp's default): beside "
            "other work on the machine a step can be many times slower (docs/PERFORMANCE.md, 'CPU "
            "threads'). The metagrad command avoids it: call metagrad.tune_process() at the top of your "
            "script, before torch is imported, to do the same, or set "
            f"GOMP_SPINCOUNT=1000 or OMP_NUM_THREADS=1 before Python starts. On cores of your own, "
            f"{ENV_VAR}=default silences this.")
