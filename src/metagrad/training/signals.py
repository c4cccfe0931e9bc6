"""SIGINT and SIGTERM during a run: a flag checked between iterations, and the error that reports the stop.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

from metagrad.errors import MetagradError
from metagrad.training import distributed
from metagrad.training.distributed import ONE_PROCESS, World

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

__all__ = ["StopFlag", "TrainingInterrupted"]


class TrainingInterrupted(MetagradError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations.

    The first signal sets the flag and restores the previous handlers, so a second Ctrl-C interrupts
    at once (without a final checkpoint). Handlers are installed only in the main thread.

    With ``keep_handlers`` (under torchrun) later signals are absorbed too: a Ctrl-C reaches each
    process twice, from the terminal and again from torchrun, and torchrun itself kills processes
    that do not stop within its own timeout.
    """

    def __init__(self, *, keep_handlers: bool = False) -> None:
        self.signum: int | None = None
        self._keep_handlers = keep_handlers
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._keep_handlers:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, world: World = ONE_PROCESS) -> int | None:
        """The signal that asks to stop, or None; under torchrun, the same answer in every process.

        A signal can reach the processes at different moments: they agree first, so that all stop
        at the same point (one that has not seen it yet reports SIGTERM).
        """
        if distributed.any_rank(world, self.signum is not None):
            return self.signum or signal.SIGTERM
        return None

    def check(self, world: World = ONE_PROCESS) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived (for phases with nothing to save)."""
        signum = self.requested(world)
        if signum is not None:
            raise TrainingInterrupted(f"{signal.Signals(signum).name} received", signum)
