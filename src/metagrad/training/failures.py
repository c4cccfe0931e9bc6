"""What stops a step: NaN or infinite losses and parameters, overflows and running out of memory, each
turned into one :class:`~metagrad.errors.TrainingError` that says where the last good checkpoint is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from metagrad.errors import TrainingError
from metagrad.types import Params

__all__ = ["check_finite", "diverged", "out_of_memory", "saved_note", "step_guard"]


def saved_note(latest: Path) -> str:
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was written yet"


def diverged(what: str, iteration: int, latest: Path) -> TrainingError:
    return TrainingError(
        f"{what} at iteration {iteration}: training stopped before that update, {saved_note(latest)}; "
        "try a smaller --meta-lr or --inner-lr"
    )


@contextlib.contextmanager
def step_guard(iteration: int, latest: Path) -> Iterator[None]:
    """One message for what absurd settings make a step hit: a number too large for its type (torch's
    "cannot be converted ... without overflow", e.g. Adam with a huge learning rate) stops as a NaN loss
    does; running out of memory names the settings that size a step."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)
        if out_of_memory(exc):
            raise TrainingError(
                f"out of memory at iteration {iteration} ({reason}); {saved_note(latest)}. Lower "
                "--meta-batch-size, --tasks-per-chunk or --eval-tasks (or the model's size), or free memory"
            ) from None
        if "overflow" not in reason:
            raise
        raise diverged(f"a value overflowed ({reason})", iteration, latest) from None


def out_of_memory(exc: BaseException) -> bool:
    """True for the allocators' failures: Python's MemoryError, torch's CPU and CUDA out-of-memory errors."""
    text = str(exc)
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def check_finite(params: Params, iteration: int, latest: Path) -> None:
    """Refuse to go on (and so to save) with a NaN or infinite parameter."""
    bad = [name for name, tensor in params.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise diverged(f"parameter {bad[0]} is not finite", iteration, latest)
