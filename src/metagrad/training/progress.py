"""Progress display: a tqdm bar on a terminal, a metric line every so often otherwise.

The loop hands every metric row to :meth:`Progress.row`. On a terminal (stderr is a TTY) the bar shows
the iteration, the latest loss and accuracy and tasks per second, and validation and test rows are
printed above it. Without a terminal (a log file, CI, ``nohup``) there is no bar; one train row every
``log_every`` iterations is printed instead, besides every validation and test row. Rows are printed
to stdout as JSON, so ``metagrad train ... > log.jsonl`` gives a machine-readable log.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

__all__ = ["Progress"]


class Progress:
    """Shows training progress; use as a context manager around the loop.

    Args:
        total: the run's last iteration.
        initial: the iteration the run starts from (non-zero when resuming).
        log_every: without a terminal, print one train row every this many iterations.
        enabled: False prints nothing at all (the Python API's ``quiet=True``).
    """

    def __init__(self, total: int, initial: int, log_every: int, *, enabled: bool = True) -> None:
        self.log_every = log_every
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._total = total
        self._initial = initial
        self._bar: tqdm | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if self.interactive:
            self._bar = self._stack.enter_context(
                tqdm(total=self._total, initial=self._initial, desc="meta-train", unit="it",
                     dynamic_ncols=True)
            )
            # Log records (warnings, checkpoint notes) go above the bar instead of through it.
            self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._bar = None  # later rows (the test row) are printed as plain lines

    def row(self, row: dict[str, Any]) -> None:
        """Report one metric row (see :mod:`metagrad.training.metrics`)."""
        if not self.enabled:
            return
        if row["split"] == "train":
            if self._bar is not None:
                self._bar.update(row["step"] - self._bar.n)
                self._bar.set_postfix(
                    {"loss": f"{row['loss']:.4f}", "acc": f"{row['acc']:.3f}",
                     "tasks/s": f"{row['tasks_per_sec']:.0f}"},
                    refresh=False,
                )
                return
            if row["step"] % self.log_every != 0:
                return
        line = json.dumps(row)
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
