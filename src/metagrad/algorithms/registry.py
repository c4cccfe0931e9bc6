"""The algorithms by name: the CLI, the config and the learn2learn layer find them here.

An algorithm is one file under ``algorithms/`` whose ``ALGORITHM`` is its ``Algorithm`` subclass; one
line below, the file's name, makes it reachable everywhere (``--algorithm NAME``, ``meta.algorithm``,
``make``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from metagrad.algorithms.base import Algorithm
from metagrad.errors import ConfigError

__all__ = ["ALGORITHMS", "check_algorithm", "make"]

_FILES = (
    "maml",
    "anil",
    "boil",
    "reptile",
)

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (import_module(f"metagrad.algorithms.{file}").ALGORITHM for file in _FILES)}
"""Algorithm name -> its class."""


def check_algorithm(name: str) -> None:
    """Raise ``ConfigError`` naming the valid algorithms unless ``name`` is one of ``ALGORITHMS``."""
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}")


def make(name: str, **settings: Any) -> Algorithm:
    """The algorithm ``name`` with ``settings`` (``inner_lr``, ``inner_steps``, ...), checked.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones) or a bad setting.
    """
    check_algorithm(name)
    return ALGORITHMS[name](**settings)
