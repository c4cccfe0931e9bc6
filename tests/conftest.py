"""Shared fixtures: tiny synthetic data so unit tests never download anything."""

from __future__ import annotations

import os
from pathlib import Path

# The suite shares its cores with other work, and runs several processes at once (torchrun tests): before
# torch loads, let idle OpenMP threads spin only briefly, as the command does (metagrad/_openmp.py), or
# spinning threads make the multi-threaded tests many times slower.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# isort: split
import pytest
import torch

from metagrad.data.datasets import FewShotDataset


def real_data_dir() -> Path | None:
    """The folder holding the real ``omniglot/`` archives: ``$METAGRAD_DATA``, else ``../shared/data``."""
    candidates = []
    if os.environ.get("METAGRAD_DATA"):
        candidates.append(Path(os.environ["METAGRAD_DATA"]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if (path / "omniglot").is_dir():
            return path
    return None


@pytest.fixture
def real_data() -> Path:
    """``real_data_dir()``, or skip the test with the reason."""
    found = real_data_dir()
    if found is None:
        pytest.skip("the real Omniglot is not in $METAGRAD_DATA or ../shared/data beside the checkout")
    return found


@pytest.fixture
def tiny_dataset() -> FewShotDataset:
    """10 classes x 20 images of 1x8x8 random uint8 pixels."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 20, 1, 8, 8), dtype=torch.uint8, generator=g)
    return FewShotDataset("tiny", "train", images, [f"class{i}" for i in range(10)])
