"""StopFlag's phases that a signal may cut short: a phase that ends within the grace period ends
normally with the flag set, a longer one stops, a second signal stops it at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from metagrad.training import signals
from metagrad.training.signals import StopFlag, TrainingInterrupted


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # Python-level work: the handler runs between two operations
        sum(range(1000))


@pytest.fixture(autouse=True)
def short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signals, "GRACE_S", 0.3)


def test_a_phase_shorter_than_the_grace_ends_with_the_flag_set() -> None:
    with StopFlag() as stop:
        with stop.abortable("in the phase"):
            os.kill(os.getpid(), signal.SIGTERM)
            _busy(0.05)
        assert stop.signum == signal.SIGTERM and stop.requested() == signal.SIGTERM
        _busy(0.6)  # the grace timer was cancelled with the phase: nothing fires afterwards


@pytest.mark.parametrize("keep_handlers", [False, True])
def test_a_longer_phase_is_cut_short_after_the_grace(keep_handlers: bool) -> None:
    with StopFlag(keep_handlers=keep_handlers) as stop:
        start = time.monotonic()
        with pytest.raises(TrainingInterrupted, match="^SIGINT received in the phase$") as caught, \
                stop.abortable("in the phase"):
            os.kill(os.getpid(), signal.SIGINT)
            _busy(10)
        assert time.monotonic() - start < 2 and caught.value.exit_code == 128 + signal.SIGINT


def test_a_second_signal_cuts_a_phase_at_once_and_a_late_phase_has_its_grace() -> None:
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # between phases: the flag
        start = time.monotonic()
        # a phase begun after the signal has the grace from its start
        with pytest.raises(TrainingInterrupted, match="SIGTERM received while validating"), \
                stop.abortable("while validating"):
            _busy(10)
        assert 0.25 < time.monotonic() - start < 2
    with StopFlag() as stop:
        start = time.monotonic()
        with pytest.raises(TrainingInterrupted, match="SIGTERM received x"), stop.abortable("x"):
            os.kill(os.getpid(), signal.SIGTERM)
            _busy(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            _busy(10)
        assert time.monotonic() - start < 0.25


def test_a_phase_leaves_the_handlers_as_it_found_them() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopFlag()
    with stop.abortable("x"):  # never entered: the phase installs, then restores
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # restores the previous handlers
        with stop.abortable("x"):
            _busy(0.05)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
