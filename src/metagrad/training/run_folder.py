"""The run folder: its file names, which folder a run uses, the checks before a new run or a resume
overwrites or continues one, and writing results into it.

Locking the folder is :mod:`metagrad.training.runlock`; the checkpoints in it,
:mod:`metagrad.training.checkpoint`; the metrics files, :mod:`metagrad.training.metrics`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from metagrad.data._io import write_text_atomically
from metagrad.errors import ConfigError, FileError, ResultNotSaved, describe_os_error
from metagrad.training.checkpoint import previous_path
from metagrad.training.config import (
    CONFIG_NAME,
    Config,
    check_resume_compatible,
    config_from_dict,
    load_config_file,
    save_config,
)
from metagrad.training.distributed import World
from metagrad.training.loggers import STATE_NAME, TENSORBOARD_DIR
from metagrad.training.metrics import CSV_NAME, JSONL_NAME

__all__ = [
    "BEST_NAME",
    "CONFIG_NAME",
    "LATEST_NAME",
    "RESULTS_NAME",
    "RUN_FILES",
    "TOP_DIR",
    "check_run_dir",
    "create_run_dir",
    "default_run_dir",
    "resume_command",
    "run_dir_of",
    "run_files",
    "undo_failed_start",
    "write_result",
]


LATEST_NAME = "latest.pt"


BEST_NAME = "best.pt"


RESULTS_NAME = "results.json"


RUN_FILES = frozenset({CONFIG_NAME, JSONL_NAME, CSV_NAME, LATEST_NAME, BEST_NAME, RESULTS_NAME,
                       previous_path(Path(LATEST_NAME)).name, previous_path(Path(BEST_NAME)).name,
                       "learning_curves.png", STATE_NAME})
"""The files a run writes (besides ``eval_*.json``, ``top/`` and TensorBoard's event files): a new run never
overwrites them without ``overwrite``. (A new run's W&B run has a new id: earlier ones stay in ``wandb/``.)"""


def default_run_dir(preset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{preset}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started in the same second
        path = Path("runs") / f"{preset}-{stamp}-{suffix}"
        suffix += 1
    return path


def run_dir_of(config: Config, resume: bool) -> Path:
    """The run folder ``config`` names (or a new default one); checks only that it can be a folder."""
    if resume and config.run.run_dir is None:
        raise ConfigError("--resume needs the run folder: metagrad train --resume --run-dir DIR")
    run_dir = Path(config.run.run_dir) if config.run.run_dir is not None else default_run_dir(config.preset)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder")
    return run_dir


TOP_DIR = "top"
"""The folder of the K best validation checkpoints (``run.keep_best``, :mod:`metagrad.training.top_k`)."""


def run_files(run_dir: Path) -> list[str]:
    """The names of the files in ``run_dir`` that a run writes (config, metrics, checkpoints, results),
    those in ``top/`` and ``tensorboard/`` as ``top/<name>``, ``tensorboard/<name>`` (or ``top`` itself when
    it is a symbolic link: removing the run's files removes the link, never files where it points)."""
    names = [p.name for p in run_dir.glob("*") if p.name in RUN_FILES or p.match("eval_*.json")]
    if (run_dir / TOP_DIR).is_symlink():  # the link itself is the run's file: never what it points to
        names.append(TOP_DIR)
    else:
        names += [f"{TOP_DIR}/{p.name}" for p in run_dir.glob(f"{TOP_DIR}/iteration_*.pt")]
    if not (run_dir / TENSORBOARD_DIR).is_symlink():  # never remove files through a link out of the run
        events = run_dir.glob(f"{TENSORBOARD_DIR}/events.out.tfevents.*")
        names += [f"{TENSORBOARD_DIR}/{p.name}" for p in events]
    return sorted(names)


def check_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> None:
    """Check that ``run_dir`` suits ``resume`` (it holds a run) or a new run (it holds none, or
    ``overwrite``); nothing is written yet."""
    if resume:
        if overwrite:
            raise ConfigError("--resume continues the run in --run-dir, --overwrite replaces it: choose one")
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(
                f"no run to resume in {run_dir} (it holds no {CONFIG_NAME}); "
                f"start a new run with: metagrad train --run-dir {run_dir}"
            )
        saved = config_from_dict(load_config_file(run_dir / CONFIG_NAME), source=str(run_dir / CONFIG_NAME))
        check_resume_compatible(saved, config)
        return
    found = run_files(run_dir)
    if found and not overwrite:
        what = ("a run" if CONFIG_NAME in found
                else f"files of a run ({', '.join(found)}) but no {CONFIG_NAME}")
        raise ConfigError(
            f"{run_dir} already holds {what}; continue it with --resume, replace it with --overwrite, "
            "or pass another --run-dir"
        )


def create_run_dir(config: Config, run_dir: Path) -> None:
    """Write the new run's config.json, after removing an earlier run's files (``--overwrite``)."""
    for name in run_files(run_dir):
        try:
            (run_dir / name).unlink()
        except OSError as exc:
            raise FileError(describe_os_error(exc, "remove the earlier run's file", run_dir / name)) from None
    save_config(config, run_dir / CONFIG_NAME)


def undo_failed_start(run_dir: Path) -> None:
    """Remove the files a new run wrote (config.json, the metrics) when it failed before any checkpoint:
    there is nothing to resume or evaluate, and a half-made run would make the next try need --overwrite.
    A run with a checkpoint is kept whole. What cannot be removed stays (the error already says why)."""
    if (run_dir / LATEST_NAME).exists() or (run_dir / BEST_NAME).exists():
        return
    for name in run_files(run_dir):
        try:
            (run_dir / name).unlink()
        except OSError:
            pass


def resume_command(world: World, run_dir: Path) -> str:
    launcher = "torchrun <the same options> -m metagrad" if world.size > 1 else "metagrad"
    return f"{launcher} train --resume --run-dir {run_dir}"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a result as JSON atomically; on failure raise :class:`ResultNotSaved` holding ``result``."""
    try:
        write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise ResultNotSaved(describe_os_error(exc, "write", path) + "; the result is printed above, "
                             "and the earlier file, if any, is unchanged", result) from None
