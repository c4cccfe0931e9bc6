"""Progress display: a tqdm bar on a terminal, a metric line every so often otherwise, all on stderr.

The loop hands every metric row to :meth:`Progress.row`. On a terminal (stderr is a TTY) the bar shows
the iteration, the latest loss and accuracy and tasks per second, and validation and test rows are
printed above it. Without a terminal (a log file, CI, ``nohup``) there is no bar; one train row every
``log_every`` iterations is printed instead, besides every validation and test row. Rows are printed
to stderr as JSON; stdout carries only results. The machine-readable log is the run folder's
``metrics.jsonl``.

Progress never decides a run's fate: when stderr cannot be written (a closed pipe, a full disk under
``2> log``), the display turns itself off and training goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

__all__ = ["Progress"]

logger = logging.getLogger(__name__)


class Progress:
    """Shows training progress on stderr; use as a context manager around the loop.

    Args:
        total: the run's last iteration.
        initial: the iteration the run starts from (non-zero when resuming).
        log_every: without a terminal, print one train row every this many iterations.
        enabled: False prints nothing at all (the Python API's ``quiet=True``).
    """

    def __init__(self, total: int, initial: int, log_every: int, *, enabled: bool = True) -> None:
        self.log_every = log_every
        self.enabled = enabled
        self.interactive = enabled and _isatty(sys.stderr)
        self._total = total
        self._initial = initial
        self._bar: tqdm | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Self:
        if self.interactive:
            with self._guard():
                self._bar = self._stack.enter_context(
                    tqdm(total=self._total, initial=self._initial, desc="meta-train", unit="it",
                         dynamic_ncols=True, file=sys.stderr)
                )
                # Log records (warnings, checkpoint notes) go above the bar instead of through it.
                self._stack.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self._stack.close()
        except OSError:  # the bar's last refresh could not be written: nothing to show it on
            pass
        self._bar = None  # later rows (the test row) are printed as plain lines

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Turn the display off, instead of failing the run, when stderr cannot be written."""
        try:
            yield
        except OSError as exc:
            self.enabled = False
            self._close()
            logger.debug("progress display turned off: stderr cannot be written (%s)", exc)

    def row(self, row: dict[str, Any]) -> None:
        """Report one metric row (see :mod:`metagrad.training.metrics`)."""
        if not self.enabled:
            return
        with self._guard():
            self._show(row)

    def _show(self, row: dict[str, Any]) -> None:
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
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # a closed stream
        return False
