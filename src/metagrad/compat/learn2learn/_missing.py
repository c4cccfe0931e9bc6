"""The error for a learn2learn 0.2.0 name this layer does not provide: it names docs/MIGRATION.md and
what to use instead, where learn2learn scripts would otherwise end in a bare ``AttributeError``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["missing_names"]

GUIDE = "docs/MIGRATION.md (\"What metagrad does not provide\") in metagrad's repository"


def missing_names(module: str, instead: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``module``: every lookup that reaches it fails, with ``instead[name]``
    (what to use in its place) when the name is one of learn2learn's, and the guide's name always."""

    def __getattr__(name: str) -> object:
        if name.startswith("__"):  # Python's own probes (__path__, __wrapped__...): the usual error
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name in instead:
            short = module.replace("metagrad.compat.learn2learn", "l2l")
            raise AttributeError(f"learn2learn's {short}.{name} is not provided by "
                                 f"metagrad.compat.learn2learn: {instead[name]}. See {GUIDE}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}: it is not one of learn2learn "
                             f"0.2.0's names that this layer provides; see {GUIDE}")

    return __getattr__
