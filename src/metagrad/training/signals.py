"""SIGINT and SIGTERM during a run: a flag checked between iterations, phases a signal may cut short
(a step or an evaluation that goes on for long), and the error that reports the stop.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from metagrad.errors import MetagradError
from metagrad.training import distributed
from metagrad.training.distributed import ONE_PROCESS, World

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

__all__ = ["GRACE_S", "StopFlag", "TrainingInterrupted"]

GRACE_S = 2.0
"""Seconds a phase run under :meth:`StopFlag.abortable` may go on after SIGINT/SIGTERM before it is cut
short: an ordinary step ends well within them (and is then checkpointed), the first step of a huge
meta-batch or a long evaluation does not."""


class TrainingInterrupted(MetagradError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations.

    The first signal sets the flag and restores the previous handlers, so a second Ctrl-C interrupts
    at once (without a final checkpoint). Handlers are installed only in the main thread. A phase run
    under :meth:`abortable` (a training step, an evaluation's chunk of tasks) is cut short when it goes
    on :data:`GRACE_S` seconds after the signal, or at a second one.

    With ``keep_handlers`` (under torchrun) later signals are absorbed too: a Ctrl-C reaches each
    process twice, from the terminal and again from torchrun, and torchrun itself kills processes
    that do not stop within its own timeout.
    """

    def __init__(self, *, keep_handlers: bool = False) -> None:
        self.signum: int | None = None
        self._keep_handlers = keep_handlers
        self._previous: dict[int, Any] = {}
        self._abortable = False  # inside abortable(): a signal may cut the phase short
        self._abandoned = False  # ... and did
        self._nudged = False  # GRACE_S have passed since the signal, in the phase
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._install()
        return self

    def _install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        if self._abortable:  # a phase that may be cut short: let it end, or cut it after GRACE_S
            if self._nudged or not (first or self._keep_handlers):  # the grace timer's, or a second one
                self._abandoned = True
                raise TrainingInterrupted(f"{signal.Signals(self.signum or signum).name} received", signum)
            self._start_timer()
            return
        if not self._keep_handlers:
            self._restore()

    def _start_timer(self) -> None:
        self._timer = threading.Timer(GRACE_S, self._nudge)
        self._timer.daemon = True
        self._timer.start()

    def _nudge(self) -> None:
        # Runs the handler again in the main thread, between two Python operations of the phase.
        if self._abortable and self.signum is not None:
            self._nudged = True
            _thread.interrupt_main(self.signum)

    @contextlib.contextmanager
    def abortable(self, what: str) -> Iterator[None]:
        """A phase that SIGINT/SIGTERM may cut short: one still running :data:`GRACE_S` seconds after
        the signal (or at a second signal) stops with :class:`TrainingInterrupted`, and nothing it
        computed is kept. A phase that ends sooner ends normally, with the flag set.

        Args:
            what: the rest of the error's message: where it stopped and what is saved, e.g.
                ``"during iteration 7 (not saved); latest.pt (iteration 5) is intact"``.
        """
        if threading.current_thread() is not threading.main_thread():  # no handlers there
            with self._stopped_as(what):
                yield
            return
        installed_here = not self._previous  # restored after a signal (or never entered): ours for the phase
        if installed_here:
            self._install()
        self._abortable = True
        if self.signum is not None:  # the signal came before the phase: it has GRACE_S from its start
            self._start_timer()
        try:
            with self._stopped_as(what):
                yield
        finally:
            self._abortable = False
            if self._timer is not None:
                self._timer.cancel()
            if installed_here or (self.signum is not None and not self._keep_handlers):
                self._restore()  # as after a signal outside the phase: a second one interrupts at once

    @contextlib.contextmanager
    def _stopped_as(self, what: str) -> Iterator[None]:
        try:
            yield
        except TrainingInterrupted as exc:
            raise TrainingInterrupted(f"{exc} {what}".rstrip(), exc.exit_code - 128) from None
        except BaseException:
            if not self._abandoned:  # torch may wrap the handler's error (raised inside an autograd call)
                raise
            signum = self.signum or signal.SIGTERM
            message = f"{signal.Signals(signum).name} received {what}".rstrip()
            raise TrainingInterrupted(message, signum) from None

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
