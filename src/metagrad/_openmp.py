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

SETTING = {"GOMP_SPINCOUNT": "300000"}
"""What the command sets: libgomp's documented default (spin 300,000 times, then sleep), written out so
that what was measured is what runs. Spinning is what makes a step fast on idle cores; it stalls only
on a core another process needs, and the command's threads never take those
(``metagrad.training.threads``). Measured in docs/PERFORMANCE.md, "CPU threads"."""

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


def spinning_warning(device_type: str, threads: int, environ: Mapping[str, str] = os.environ, *,
                     following: bool = False) -> str | None:
    """The warning for a CPU run of several spinning threads that do not follow the free cores, else None.

    That is a process the ``metagrad`` command did not start (a script or notebook calling
    :func:`metagrad.training.run`) whose user set none of libgomp's variables and did not call
    ``metagrad.training.threads.follow_free_cores()`` (``following``).
    """
    if device_type != "cpu" or threads <= 1 or following or not requested(environ):
        return None
    if any(name in environ for name in USER_VARIABLES):
        return None
    return (f"this process's {threads} OpenMP threads spin while they wait (libgomp's default): beside "
            "other work on the machine a step can be many times slower (docs/PERFORMANCE.md, 'CPU "
            "threads'). The metagrad command avoids it by using only the cores other processes leave free: "
            "call metagrad.training.threads.follow_free_cores() before training to do the same, or set "
            f"OMP_NUM_THREADS=1 or GOMP_SPINCOUNT=1000 before Python starts. On cores of your own, "
            f"{ENV_VAR}=default silences this.")
