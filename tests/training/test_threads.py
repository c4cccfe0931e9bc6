"""The commands' CPU threads follow the free cores: decisions from /proc/stat, net of this process's time."""

from __future__ import annotations

import sys

import pytest
import torch

from metagrad.training import threads
from metagrad.training.threads import FreeCoreThreads, busy_ticks

STAT = """cpu  900 0 100 1000 0 0 0 0 0 0
cpu0 400 0 50 500 0 0 0 0 0 0
cpu1 500 0 50 500 0 0 0 0 0 0
cpu2 7 0 0 1 0 0 0 0 0 0
intr 12345
"""


def test_busy_ticks_counts_only_the_given_cpus_and_the_busy_fields():
    assert busy_ticks([0, 1], STAT) == (1000, 2000)
    assert busy_ticks([2], STAT) == (7, 8)
    assert busy_ticks([], STAT) == (0, 0)


class FakeMachine:
    """Two CPUs at 100 ticks per second; ``load(own, others)`` cores busy over the next second."""

    def __init__(self) -> None:
        self.time = 0.0
        self.own = 0.0
        self.busy = [0, 0]
        self.idle = [0, 0]
        self.set_calls: list[int] = []

    def load(self, own: float, others: float, seconds: float = 1.0) -> None:
        total = min(2.0, own + others)
        for cpu in range(2):
            share = min(1.0, max(0.0, total - cpu))
            self.busy[cpu] += round(100 * seconds * share)
            self.idle[cpu] += round(100 * seconds * (1 - share))
        self.own += own * seconds
        self.time += seconds

    def stat(self) -> str:
        return "".join(f"cpu{i} {b} 0 0 {d} 0 0 0 0\n" for i, (b, d) in enumerate(zip(self.busy, self.idle)))

    def governor(self, max_threads: int = 2) -> FreeCoreThreads:
        return FreeCoreThreads([0, 1], max_threads, read_stat=self.stat, own_seconds=lambda: self.own,
                               clock=lambda: self.time, set_threads=self.set_calls.append,
                               ticks_per_second=100)


def test_idle_cores_keep_every_thread():
    machine = FakeMachine()
    governor = machine.governor()
    for _ in range(5):
        machine.load(own=2.0, others=0.0)
        assert governor.tick() is None
    assert governor.threads == 2 and machine.set_calls == []


def test_a_busy_neighbour_takes_a_thread_away_at_once_and_its_leaving_gives_it_back_after_two_looks():
    machine = FakeMachine()
    governor = machine.governor()
    machine.load(own=1.0, others=1.0)  # a neighbour appears: the cores are full, half of it not ours
    assert governor.tick() == 1
    machine.load(own=1.0, others=1.0)
    assert governor.tick() is None
    machine.load(own=1.0, others=0.0)  # it left: one look is not enough
    assert governor.tick() is None and governor.threads == 1
    machine.load(own=1.0, others=0.0)
    assert governor.tick() == 2
    assert machine.set_calls == [1, 2]


def test_a_neighbour_between_two_jobs_does_not_make_the_count_flap():
    machine = FakeMachine()
    governor = machine.governor()
    machine.load(own=1.0, others=1.0)
    assert governor.tick() == 1
    for others in (0.0, 1.0, 0.0, 1.0, 0.0, 1.0):  # free, busy, free ...: never two free looks in a row
        machine.load(own=1.0, others=others)
        governor.tick()
    assert machine.set_calls == [1]


def test_decisions_wait_for_a_full_window_and_never_exceed_the_maximum():
    machine = FakeMachine()
    governor = machine.governor(max_threads=1)
    machine.load(own=0.5, others=1.5, seconds=0.5)
    assert governor.tick() is None  # half a window: no decision yet
    machine.load(own=0.5, others=1.5, seconds=0.5)
    assert governor.tick() is None  # one thread already, the fewest there are
    machine.load(own=0.0, others=0.0)
    machine.load(own=0.0, others=0.0)
    governor.tick()
    assert governor.tick() is None and governor.threads == 1  # never above max_threads



def test_a_forced_look_decides_inside_the_window_and_restore_puts_the_most_back():
    machine = FakeMachine()
    governor = machine.governor()
    machine.load(own=0.0, others=1.0, seconds=0.3)  # the first look of follow_free_cores: 0.3 s
    assert governor.tick() is None  # not a full window
    assert governor.tick(force=True) == 1 and machine.set_calls == [1]
    governor.restore()
    assert governor.threads == 2 and machine.set_calls == [1, 2]

def test_light_noise_from_other_processes_still_counts_as_free():
    machine = FakeMachine()
    governor = machine.governor()
    for _ in range(3):
        machine.load(own=1.8, others=0.2)
        assert governor.tick() is None
    assert governor.threads == 2


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, True), ({"METAGRAD_THREADS": "fixed"}, False), ({"METAGRAD_THREADS": " Fixed "}, False),
    ({"OMP_NUM_THREADS": "2"}, False), ({"METAGRAD_THREADS": "auto"}, True),
])
def test_the_user_can_keep_the_thread_count(environ, expected):
    assert threads.requested(environ) is expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_follow_free_cores_on_this_machine_starts_and_stop_puts_the_count_back(monkeypatch):
    monkeypatch.delenv("METAGRAD_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    governor = threads.follow_free_cores(settle_s=0.05)
    try:
        assert governor is not None and 1 <= governor.threads <= before
        assert torch.get_num_threads() == governor.threads
        threads.tick()  # inside the window: nothing to do
    finally:
        threads.stop()
    assert torch.get_num_threads() == before
    threads.tick()  # stopped: a no-op


def test_fixed_threads_start_nothing(monkeypatch):
    monkeypatch.setenv("METAGRAD_THREADS", "fixed")
    assert threads.follow_free_cores(settle_s=0.0) is None
