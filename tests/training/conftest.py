"""Fixtures for the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_run import fake_load_dataset

from metagrad.training import setup


@pytest.fixture
def fake_data(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict]]:
    """Make the loop load the tiny dataset for every split; returns the ``load_dataset`` calls."""
    calls: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(setup, "load_dataset", fake_load_dataset(calls))
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny runs are dominated by thread hand-offs, which a busy 2-core
    machine turns into seconds per iteration. Bit-for-bit comparisons also need the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
