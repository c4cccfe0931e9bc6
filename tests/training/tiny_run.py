"""The tiny experiment the training and CLI tests run: the synthetic dataset stands in for every split."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metagrad.data.datasets import FewShotDataset
from metagrad.training import Config, resolve_config

TINY_OVERRIDES: dict[str, Any] = {
    "data.ways": 3, "data.shots": 1, "data.query_shots": 2,
    "model.hidden_size": 8,
    "meta.meta_batch_size": 4, "meta.iterations": 6, "meta.inner_steps": 1, "meta.test_inner_steps": 2,
    "run.eval_every": 2, "run.eval_tasks": 4, "run.test_tasks": 8, "run.checkpoint_every": 2,
    "run.device": "cpu",
}
"""A run of a few seconds: 3-way 1-shot tasks with 2 queries, 8 filters, 6 iterations of 4 tasks."""


def tiny_dataset() -> FewShotDataset:
    """10 classes x 20 images of 1x8x8 random pixels (the same as tests/conftest.py's fixture)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 20, 1, 8, 8), dtype=torch.uint8, generator=g)
    return FewShotDataset("tiny", "train", images, [f"class{i}" for i in range(10)])


def fake_load_dataset(calls: list | None = None) -> Callable[..., FewShotDataset]:
    """A ``load_dataset`` stand-in returning the tiny dataset for every split (recording calls)."""
    dataset = tiny_dataset()

    def load_dataset(name: str, split: str, **kwargs: Any) -> FewShotDataset:
        if calls is not None:
            calls.append((name, split, kwargs))
        return dataclasses.replace(dataset, split=split)

    return load_dataset


def tiny_config(run_dir: Path, **overrides: Any) -> Config:
    """The tiny run in ``run_dir``, with more ``section.key`` overrides."""
    return resolve_config(overrides={**TINY_OVERRIDES, "run.run_dir": str(run_dir), **overrides})
