"""``DataDescription``: one sample of a task description (learn2learn's data model for tasks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["DataDescription"]


class DataDescription:
    """A sample of a task: its ``index`` in the dataset and the ``transforms`` that turn it into data.

    The first transform is usually ``LoadData``'s ``index -> dataset[index]``; each later one maps the
    previous result (e.g. ``RemapLabels`` changes the label of the ``(sample, label)`` pair).
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.transforms: list[Callable[[Any], Any]] = []

    def __repr__(self) -> str:
        return f"DataDescription(index={self.index}, transforms={len(self.transforms)})"
