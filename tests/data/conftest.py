"""Fixtures for the data tests: small data sets in the real formats (see data_builders.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_builders import (
    SMALL_CIFARFS_COUNTS,
    SMALL_COUNTS,
    SMALL_CUB_COUNTS,
    SMALL_FC100_COUNTS,
    SMALL_MAML_SPLITS,
    SMALL_MINI_COUNTS,
    SMALL_TIERED_COUNTS,
    write_omniglot_zips,
)

from metagrad.data import cifarfs, cub, fc100, miniimagenet, omniglot, tieredimagenet


@pytest.fixture
def small_omniglot(tmp_path: Path) -> Path:
    """``<tmp>/data/omniglot/`` holding the two small official-layout zips; returns ``<tmp>/data``."""
    write_omniglot_zips(tmp_path / "data" / "omniglot")
    return tmp_path / "data"


@pytest.fixture
def small_counts(monkeypatch: pytest.MonkeyPatch) -> omniglot.Counts:
    """Make the small fixture count as complete for the public entry points (load_dataset, info)."""
    monkeypatch.setattr(omniglot, "OFFICIAL_COUNTS", SMALL_COUNTS)
    monkeypatch.setattr(omniglot, "MAML_SPLITS", SMALL_MAML_SPLITS)
    return SMALL_COUNTS


@pytest.fixture
def small_mini_counts(monkeypatch: pytest.MonkeyPatch) -> miniimagenet.Counts:
    monkeypatch.setattr(miniimagenet, "OFFICIAL_COUNTS", SMALL_MINI_COUNTS)
    return SMALL_MINI_COUNTS


@pytest.fixture
def small_benchmark_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the small CIFAR-FS, FC100, tiered-ImageNet and CUB fixtures count as complete."""
    monkeypatch.setattr(cifarfs, "OFFICIAL_COUNTS", SMALL_CIFARFS_COUNTS)
    monkeypatch.setattr(fc100, "OFFICIAL_COUNTS", SMALL_FC100_COUNTS)
    monkeypatch.setattr(tieredimagenet, "OFFICIAL_COUNTS", SMALL_TIERED_COUNTS)
    monkeypatch.setattr(cub, "OFFICIAL_COUNTS", SMALL_CUB_COUNTS)
