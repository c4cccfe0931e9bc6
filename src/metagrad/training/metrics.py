"""Metric rows in a run folder (JSON lines and CSV), and the confidence interval of a test score.

Every row has the same keys, :data:`COLUMNS` and a run's learned inner rates (:func:`rate_columns`):
``step`` (the iteration after which it was measured), ``split`` (``train``, ``validation`` or ``test``),
``loss`` and ``acc`` (means over the row's tasks), ``acc_ci95`` (validation and test: the 95% CI of
``acc``), ``sec_per_iter`` (train rows: the step's wall time), ``train_seconds`` (train and validation
rows: the sum of ``sec_per_iter`` so far, over every resume: training time, evaluation excluded),
``tasks_per_sec``, ``lr`` (the meta learning rate), ``grad_norm`` (train: the meta-gradient's L2 norm),
``peak_mem_mb`` (train: rank 0's peak so far, :func:`peak_memory_mb`) and, with learned inner
rates, ``inner_lr.<name>`` (train: each rate tensor's mean). Missing values are ``null`` in JSON and
empty in CSV. Both files are appended one flushed line at a time; a checkpoint records their sizes so
that a resumed run cuts them back to what the checkpoint saw. The loggers (TensorBoard, W&B:
:mod:`metagrad.training.loggers`) mirror these rows, as :meth:`MetricsWriter.mirror` sends them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import resource
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from metagrad.data._io import no_follow
from metagrad.errors import FileError, TrainingError, describe_os_error
from metagrad.types import Params

if TYPE_CHECKING:
    from metagrad.training.progress import Progress

__all__ = ["COLUMNS", "WALL_CLOCK_COLUMNS", "MetricsWriter", "Mirror", "gradient_norm", "mean_ci95",
           "peak_memory_mb", "rate_columns", "rate_values", "read_metrics", "report_row"]

COLUMNS = ("step", "split", "loss", "acc", "acc_ci95", "sec_per_iter", "train_seconds", "tasks_per_sec", "lr",
           "grad_norm", "peak_mem_mb")

WALL_CLOCK_COLUMNS = frozenset({"sec_per_iter", "train_seconds", "tasks_per_sec", "peak_mem_mb"})
"""Columns that measure the machine, not the computation: a resumed run matches an uninterrupted one in
every other column, bit for bit (on CPU)."""

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


def rate_columns(rates: Params) -> tuple[str, ...]:
    """The columns of a run's learned inner rates, named as the outer loop names them: ``inner_lr.<name>``."""
    from metagrad.algorithms import meta_rates

    return tuple(meta_rates(rates))


def rate_values(rates: Params) -> dict[str, float]:
    """Each learned inner rate tensor's mean, by :func:`rate_columns` name (one device sync)."""
    from metagrad.algorithms import meta_rates

    named = meta_rates(rates)
    if not named:
        return {}
    means = torch.stack([t.detach().float().mean() for t in named.values()]).tolist()
    return dict(zip(named, means))


def gradient_norm(params: Params) -> float:
    """The L2 norm of the gradients held in ``params``' ``.grad`` (the meta-gradient): each tensor's norm,
    then theirs (no copy of the gradients; one device sync)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params.values() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms).double()).item() if norms else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """The process's peak memory so far, in MiB: ``torch.cuda.max_memory_allocated`` on CUDA, else the
    peak resident set size (Linux reports ``ru_maxrss`` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Mirror(Protocol):
    """Where :class:`MetricsWriter` sends each row after the files (:mod:`metagrad.training.loggers`)."""

    def log(self, row: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl`` and ``metrics.csv`` in a run folder.

    It fills in ``train_seconds`` (the sum of the train rows' ``sec_per_iter``, continued from the rows a
    resumed run keeps) and sends every row to its mirrors (:meth:`mirror`).

    Args:
        run_dir: the run folder.
        offsets: ``{"jsonl": bytes, "csv": bytes}`` to cut both files back to (a checkpoint's
            :meth:`offsets`), or None to start new files.
        columns: the row keys: :data:`COLUMNS` and the run's :func:`rate_columns`. A resumed CSV keeps
            the columns its header names (a run started by an older version: the new ones are in
            the JSON lines only).

    Attributes:
        kept: the rows a resumed run keeps (those the checkpoint saw), in order; [] for a new run.

    Raises:
        TrainingError: a file is shorter than ``offsets`` says (it was edited or lost since).
        FileError: a file cannot be opened or written (here or by any method): full disk, read-only...
    """

    def __init__(self, run_dir: Path, offsets: dict[str, int] | None = None,
                 columns: Sequence[str] = COLUMNS) -> None:
        self.jsonl_path = run_dir / JSONL_NAME
        self.csv_path = run_dir / CSV_NAME
        self.columns = tuple(columns)
        self.csv_columns = self.columns
        self.kept: list[dict[str, Any]] = []
        self._mirrors: list[Mirror] = []
        with self._failing_as(self.jsonl_path):
            if offsets is None:
                # both stay open for the whole run (one row per iteration) and are closed by close()
                self._jsonl = open(self.jsonl_path, "w", encoding="utf-8", opener=no_follow)  # noqa: SIM115
            else:
                self.kept = _rows_before(self.jsonl_path, offsets["jsonl"])
                self._jsonl = _open_truncated(self.jsonl_path, offsets["jsonl"])
        with self._failing_as(self.csv_path):
            if offsets is None:
                self._csv = open(  # noqa: SIM115
                    self.csv_path, "w", encoding="utf-8", newline="", opener=no_follow)
                self._csv.write(",".join(self.columns) + "\n")
                self._csv.flush()
            else:
                self._csv = _open_truncated(self.csv_path, offsets["csv"])
                self.csv_columns = _csv_header(self.csv_path) or self.columns
        train = [r for r in self.kept if r["split"] == "train"]
        # older runs have no train_seconds column: their sec_per_iter add up to the same
        self.train_seconds = (train[-1].get("train_seconds") if train else 0.0) or \
            math.fsum(r.get("sec_per_iter") or 0.0 for r in train)

    def mirror(self, mirrors: Sequence[Mirror]) -> None:
        """Send every row written from now on to ``mirrors`` too, after the files; :meth:`close`
        closes them."""
        self._mirrors = list(mirrors)

    @contextlib.contextmanager
    def _failing_as(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:  # a write on an open file names no file: say which
            raise FileError(describe_os_error(exc, "write", path)) from None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (keys from ``columns``; missing keys are written as null), then mirror it."""
        row = {key: row.get(key) for key in self.columns}
        if row["split"] == "train" and row["sec_per_iter"] is not None:
            self.train_seconds += row["sec_per_iter"]
        if row["split"] in ("train", "validation"):
            row["train_seconds"] = self.train_seconds
        with self._failing_as(self.jsonl_path):
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(
            ["" if row.get(k) is None else row[k] for k in self.csv_columns])
        with self._failing_as(self.csv_path):
            self._csv.write(buffer.getvalue())
            self._csv.flush()
        for mirror in self._mirrors:
            mirror.log(row)

    def offsets(self) -> dict[str, int]:
        """Current sizes of both files, after forcing them (and the mirrors) to disk (for a checkpoint)."""
        for path, handle in ((self.jsonl_path, self._jsonl), (self.csv_path, self._csv)):
            with self._failing_as(path):
                handle.flush()
                os.fsync(handle.fileno())
        for mirror in self._mirrors:  # a resume takes them to hold every row up to the checkpoint
            mirror.flush()
        return {"jsonl": self._jsonl.tell(), "csv": self._csv.tell()}

    def close(self) -> None:
        """Close both files and the mirrors; what cannot be flushed any more is lost quietly (the error
        was reported)."""
        for handle in (self._jsonl, self._csv):
            try:
                handle.close()
            except OSError:
                pass
        mirrors, self._mirrors = self._mirrors, []
        for mirror in mirrors:
            mirror.close()


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


def _rows_before(path: Path, size: int) -> list[dict[str, Any]]:
    """The rows of the first ``size`` bytes of ``path`` (none if it is missing)."""
    try:
        data = path.read_bytes()[:size]
    except FileNotFoundError:
        return []
    return [_parse_row(line.decode("utf-8", "replace"), path, number)
            for number, line in enumerate(data.splitlines(keepends=True), start=1)]


def _csv_header(path: Path) -> tuple[str, ...] | None:
    with open(path, encoding="utf-8", newline="") as handle:
        header = handle.readline().strip()
    return tuple(header.split(",")) if header else None


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
