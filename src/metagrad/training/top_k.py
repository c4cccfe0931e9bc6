"""The K best validation checkpoints of a run (``run.keep_best = K``), for ``metagrad eval --ensemble K``.

With K > 1 the run keeps, beside ``best.pt``, its K best validation checkpoints as
``top/iteration_<iteration>.pt`` (the same content as ``best.pt``: parameters, learned rates, config,
iteration, validation accuracy). Ranked by validation accuracy, higher first, and on a tie the earlier
iteration first (as ``best.pt`` keeps the earlier of two equal accuracies), so ``best.pt`` is always the
first of them.

The folder is the record: each file is written atomically (``save_checkpoint``), and a checkpoint that
leaves the top K is deleted only after the one that replaces it is written. A crash between the two leaves
K + 1 files, which the next start trims. A resumed run replays the iterations after ``latest.pt``; files
from those iterations may already exist: the replay writes the same checkpoint again under the same
name, and since the top K of a set of (accuracy, iteration) pairs does not depend on the order they come
in, the folder ends as an uninterrupted run leaves it.

Reference: the MAML++ code keeps its ``max_models_to_save = 5`` best models and ensembles them at test
time (``experiment_builder.py``, ``evaluated_test_set_using_the_best_models``).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagrad.errors import FileError, describe_os_error
from metagrad.training.checkpoint import load_checkpoint, previous_path, save_checkpoint
from metagrad.training.run_folder import TOP_DIR

__all__ = ["TOP_DIR", "Ranked", "TopCheckpoints", "ranked_checkpoints"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^iteration_(\d+)\.pt$")


@dataclass(frozen=True)
class Ranked:
    """One kept checkpoint: its validation accuracy, iteration and file."""

    val_accuracy: float
    iteration: int
    path: Path

    def key(self) -> tuple[float, int]:
        return (-self.val_accuracy, self.iteration)  # higher accuracy first, then the earlier iteration


def checkpoint_path(run_dir: Path, iteration: int) -> Path:
    return run_dir / TOP_DIR / f"iteration_{iteration:09d}.pt"


def ranked_checkpoints(run_dir: Path) -> list[Ranked]:
    """The checkpoints in ``run_dir/top/``, best first (an empty list without the folder).

    Raises:
        TrainingError: a file there (and its previous copy) cannot be read.
    """
    found = []
    folder = run_dir / TOP_DIR
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _NAME.match(path.name) is None:
            continue
        state = load_checkpoint(path)
        if state is not None:
            found.append(Ranked(float(state["val_accuracy"]), int(state["iteration"]), path))
    return sorted(found, key=Ranked.key)


class TopCheckpoints:
    """Keeps ``run_dir/top/`` at the ``keep`` best validation checkpoints as the run offers them."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        folder = run_dir / TOP_DIR
        if folder.is_symlink():  # its checkpoints would be ranked, written and deleted where it points
            raise FileError(f"{folder} is a symbolic link (to {os.readlink(folder)}); a run writes only "
                            f"inside its folder: replace the link by a folder of its own (or remove it)")
        self.run_dir, self.keep = run_dir, keep
        self.kept = ranked_checkpoints(run_dir)
        self._delete(self.kept[keep:])  # a crash between writing a new one and deleting the one it replaced
        self.kept = self.kept[:keep]

    def offer(self, val_accuracy: float, iteration: int, state: dict[str, Any]) -> None:
        """Keep ``state`` (a checkpoint of ``iteration``) if it ranks among the best ``keep``; then delete
        the one it pushes out. A checkpoint of an iteration already kept (a resumed run's replay)
        replaces it."""
        path = checkpoint_path(self.run_dir, iteration)
        new = Ranked(val_accuracy, iteration, path)
        ranked = sorted([r for r in self.kept if r.iteration != iteration] + [new], key=Ranked.key)
        if new not in ranked[:self.keep]:
            return
        try:
            path.parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise FileError(describe_os_error(exc, "create the folder of the best checkpoints",
                                              path.parent)) from None
        save_checkpoint(state, path)  # atomic: the files already kept stay until it is written
        self.kept = ranked[:self.keep]
        self._delete(ranked[self.keep:])

    def _delete(self, leaving: list[Ranked]) -> None:
        for ranked in leaving:
            for path in (ranked.path, previous_path(ranked.path)):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise FileError(describe_os_error(exc, "remove a checkpoint that left the top "
                                                      f"{self.keep}", path)) from None
            logger.debug("%s left the %d best checkpoints", ranked.path, self.keep)
