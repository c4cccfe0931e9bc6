"""Metric rows in a run folder (JSON lines and CSV), and the confidence interval of a test score.

Every row has the same keys, :data:`COLUMNS`: ``step`` (the iteration after which it was measured),
``split`` (``train``, ``validation`` or ``test``), ``loss`` and ``acc`` (means over the row's tasks),
``sec_per_iter`` (train rows only), ``tasks_per_sec`` and ``lr``. Missing values are ``null`` in JSON
and empty in CSV. Both files are appended one flushed line at a time; a checkpoint records their
sizes so that a resumed run cuts them back to what the checkpoint saw.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metagrad.data._io import no_follow
from metagrad.errors import FileError, TrainingError, describe_os_error

if TYPE_CHECKING:
    from metagrad.training.progress import Progress

__all__ = ["COLUMNS", "MetricsWriter", "mean_ci95", "read_metrics", "report_row"]

COLUMNS = ("step", "split", "loss", "acc", "sec_per_iter", "tasks_per_sec", "lr")

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the 95% confidence interval of the mean, ``1.96 * std / sqrt(n)``.

    ``std`` is the sample standard deviation (Bessel's correction, ``ddof=1``), as in the MAML code
    and most few-shot papers' 600-task evaluations.

    Args:
        values: (n,) per-task scores, n >= 2.

    Returns:
        ``(mean, ci95)`` as Python floats.

    Example:
        >>> mean_ci95(torch.tensor([0.5, 1.0, 1.0, 0.5]))  # std = sqrt(1/12); 1.96 * 0.2887 / 2
        (0.75, 0.2829016...)
    """
    values = values.detach().to(torch.float64).flatten()
    n = values.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    return values.mean().item(), 1.96 * values.std(correction=1).item() / math.sqrt(n)


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl`` and ``metrics.csv`` in a run folder.

    Args:
        run_dir: the run folder.
        offsets: ``{"jsonl": bytes, "csv": bytes}`` to cut both files back to (a checkpoint's
            :meth:`offsets`), or None to start new files.

    Raises:
        TrainingError: a file is shorter than ``offsets`` says (it was edited or lost since).
        FileError: a file cannot be opened or written (here or by any method): full disk, read-only...
    """

    def __init__(self, run_dir: Path, offsets: dict[str, int] | None = None) -> None:
        self.jsonl_path = run_dir / JSONL_NAME
        self.csv_path = run_dir / CSV_NAME
        with self._failing_as(self.jsonl_path):
            if offsets is None:
                # both stay open for the whole run (one row per iteration) and are closed by close()
                self._jsonl = open(self.jsonl_path, "w", encoding="utf-8", opener=no_follow)  # noqa: SIM115
            else:
                self._jsonl = _open_truncated(self.jsonl_path, offsets["jsonl"])
        with self._failing_as(self.csv_path):
            if offsets is None:
                self._csv = open(  # noqa: SIM115
                    self.csv_path, "w", encoding="utf-8", newline="", opener=no_follow)
                self._csv.write(",".join(COLUMNS) + "\n")
                self._csv.flush()
            else:
                self._csv = _open_truncated(self.csv_path, offsets["csv"])

    @contextlib.contextmanager
    def _failing_as(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:  # a write on an open file names no file: say which
            raise FileError(describe_os_error(exc, "write", path)) from None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (keys from :data:`COLUMNS`; missing keys are written as null)."""
        row = {key: row.get(key) for key in COLUMNS}
        with self._failing_as(self.jsonl_path):
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(["" if row[k] is None else row[k] for k in COLUMNS])
        with self._failing_as(self.csv_path):
            self._csv.write(buffer.getvalue())
            self._csv.flush()

    def offsets(self) -> dict[str, int]:
        """Current sizes of both files, after forcing them to disk (for a checkpoint)."""
        for path, handle in ((self.jsonl_path, self._jsonl), (self.csv_path, self._csv)):
            with self._failing_as(path):
                handle.flush()
                os.fsync(handle.fileno())
        return {"jsonl": self._jsonl.tell(), "csv": self._csv.tell()}

    def close(self) -> None:
        """Close both files; what cannot be flushed any more is lost quietly (the error was reported)."""
        for handle in (self._jsonl, self._csv):
            try:
                handle.close()
            except OSError:
                pass


def _open_truncated(path: Path, size: int) -> io.TextIOWrapper:
    actual = path.stat().st_size if path.exists() else -1
    if actual < size:
        raise TrainingError(
            f"{path} holds {max(actual, 0)} bytes but the checkpoint recorded {size}: the metrics were lost "
            f"or edited; restore the file or start a new run"
        )
    # the writer keeps and closes it
    handle = open(path, "r+", encoding="utf-8", newline="", opener=no_follow)  # noqa: SIM115
    handle.truncate(size)
    handle.seek(size)
    return handle


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of ``RUN_DIR/metrics.jsonl`` (a last line cut short by a crash is skipped).

    Raises:
        FileNotFoundError: the folder holds no ``metrics.jsonl``.
        FileError: the file cannot be read, or a line is not a metric row (the message gives its number).
    """
    path = Path(run_dir) / JSONL_NAME
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    break
                rows.append(_parse_row(line, path, number))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileError(describe_os_error(exc, "read", path)) from None
    except UnicodeDecodeError:
        raise FileError(f"{path} is not UTF-8 text: it was damaged; restore it or delete the bad lines") \
            from None
    return rows


def _parse_row(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        row = None
    if not (isinstance(row, dict) and isinstance(row.get("split"), str) and isinstance(row.get("step"), int)
            and all(_is_number(row.get(key)) for key in ("loss", "acc"))):
        raise FileError(f"line {number} of {path} is not a metric row ({line.strip()[:60]!r}): the file was "
                        "damaged or edited; restore it, or delete that line")
    return row


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_row(row: dict[str, Any], writer: MetricsWriter | None, progress: Progress) -> None:
    """Write a metric row to the run folder (rank 0: ``writer`` is None elsewhere) and show it."""
    if writer is not None:
        writer.write(row)
    progress.row(row)
