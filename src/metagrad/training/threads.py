"""CPU threads that follow the free cores: as many as other processes leave idle, re-decided as they change.

A MAML step runs thousands of small parallel regions. On cores of its own, threads that spin between
regions make it fast; beside another busy process a spinning thread holds the core its sibling
needs and steps stall many-fold (docs/PERFORMANCE.md, "CPU threads"). So the ``metagrad`` command's
train, eval and bench watch how busy the cores this process may run on are, net of this process's
own CPU time (Linux's ``/proc/stat``), and use as many threads as the other processes leave free,
never more than torch's default and never fewer than one. Fewer threads take effect at once (a stall
costs more than a slower step); more threads only after two windows agree, so that a neighbour
between two of its jobs does not make the count flap.

Importing this changes nothing; :func:`follow_free_cores` (the commands call it) starts the watch and
:func:`tick` (called once per step by training, evaluation and the benchmark) is a no-op until then.
``METAGRAD_THREADS=fixed``, or ``OMP_NUM_THREADS`` in the environment, keeps torch's thread count. The
thread count changes results only in the last bits (floating-point summation order), but it does change
them: a run is repeated, or resumed, bit for bit only at one thread count, so fix it for that.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "FreeCoreThreads", "busy_ticks", "follow_free_cores", "following", "requested", "stop",
           "tick"]

logger = logging.getLogger(__name__)

ENV_VAR = "METAGRAD_THREADS"
"""``fixed`` keeps torch's thread count; anything else (or unset) lets the commands follow the free cores."""

WINDOW_S = 1.0
"""Seconds of CPU accounting behind each decision: long enough for /proc/stat's 100 Hz ticks to count."""

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (guest time is inside user)
_ALL_FIELDS = 8  # ... and idle, iowait: the first eight fields add up to the CPU's whole time


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``METAGRAD_THREADS=fixed`` or ``OMP_NUM_THREADS`` says how many threads to use."""
    return environ.get(ENV_VAR, "").strip().lower() != "fixed" and "OMP_NUM_THREADS" not in environ


def busy_ticks(cpus: Iterable[int], stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of ``cpus`` since boot, from the text of ``/proc/stat``."""
    wanted = {f"cpu{n}" for n in cpus}
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if name in wanted:
            values = [int(v) for v in fields[:_ALL_FIELDS]]
            busy += sum(values[i] for i in _BUSY_FIELDS if i < len(values))
            total += sum(values)
    return busy, total


def _read_stat() -> str:
    return Path("/proc/stat").read_text()


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class FreeCoreThreads:
    """Sets torch's thread count to the cores other processes leave free, checked at most once a window.

    Args:
        cpus: the CPUs this process may run on.
        max_threads: the most threads ever used (torch's default thread count).
        read_stat, own_seconds, clock, set_threads: where the numbers come from and where the decision
            goes (``/proc/stat``, this process's CPU seconds, a monotonic clock, ``torch.set_num_threads``);
            tests pass their own.
        window_s: seconds between decisions.
    """

    def __init__(self, cpus: Iterable[int], max_threads: int, *, read_stat: Callable[[], str] = _read_stat,
                 own_seconds: Callable[[], float] = _own_seconds, clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads, window_s: float = WINDOW_S,
                 ticks_per_second: int | None = None) -> None:
        self.cpus = sorted(cpus)
        self.max_threads = max(1, max_threads)
        self.threads = self.max_threads
        self._read_stat, self._own, self._clock, self._set = read_stat, own_seconds, clock, set_threads
        self.window_s = window_s
        self._hz = ticks_per_second or os.sysconf("SC_CLK_TCK")
        self._pending: int | None = None  # a larger count seen once, adopted when the next window agrees
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, int, int]:
        busy, total = busy_ticks(self.cpus, self._read_stat())
        return self._clock(), self._own(), busy, total

    def others(self, force: bool = False) -> float | None:
        """Cores' worth of CPU used by other processes since the last decision; None inside a window
        (unless ``force``: then whatever time has passed is the window)."""
        now = self._sample()
        elapsed = now[0] - self._mark[0]
        if elapsed < self.window_s and not force:
            return None
        own_ticks = (now[1] - self._mark[1]) * self._hz
        busy, total = now[2] - self._mark[2], now[3] - self._mark[3]
        self._mark = now
        if total <= 0:
            return None
        per_cpu = total / len(self.cpus)  # ticks one CPU had in the window
        return max(0.0, busy - own_ticks) / per_cpu

    def tick(self, force: bool = False) -> int | None:
        """Re-decide once a window has passed (at once with ``force``); returns the new thread count when
        it changed, else None."""
        others = self.others(force)
        if others is None:
            return None
        free = len(self.cpus) - others
        want = min(self.max_threads, max(1, int(free + 0.25)))  # a quarter core of noise is still free
        if want == self.threads:
            self._pending = None
            return None
        if want > self.threads and self._pending != want:
            self._pending = want
            return None
        self._pending = None
        self.set(want)
        logger.debug("CPU threads: %d (other processes use %.1f of %d cores)", want, others, len(self.cpus))
        return want

    def set(self, threads: int) -> None:
        """Use ``threads`` threads from now on (``restore`` puts back the most)."""
        self.threads = threads
        self._set(threads)

    def restore(self) -> None:
        """Put back the thread count it started from."""
        self.set(self.max_threads)


_active: FreeCoreThreads | None = None


def follow_free_cores(settle_s: float = 0.3) -> FreeCoreThreads | None:
    """Start following the free cores for this process (the commands call this); None where it cannot.

    Looks at the cores for ``settle_s`` seconds first, so that a process started beside a busy one
    starts with the threads it can use. Needs Linux's ``/proc/stat``; elsewhere, or with
    ``METAGRAD_THREADS=fixed``, torch's thread count stays as it is.
    """
    global _active
    if not requested():
        return None
    try:
        cpus = os.sched_getaffinity(0)
        governor = FreeCoreThreads(cpus, torch.get_num_threads())
    except (AttributeError, OSError, ValueError):  # not Linux, or no /proc
        return None
    time.sleep(settle_s)
    governor.tick(force=True)  # it starts at the most threads: fewer, if the look says so, are taken at once
    _active = governor
    return governor


def stop() -> None:
    """Stop following the free cores and put back the thread count it started from."""
    global _active
    if _active is not None:
        _active.restore()
    _active = None


def following() -> bool:
    """True while :func:`follow_free_cores` is in effect."""
    return _active is not None


def tick() -> None:
    """Re-decide the thread count if :func:`follow_free_cores` started the watch; otherwise nothing."""
    if _active is not None:
        _active.tick()
