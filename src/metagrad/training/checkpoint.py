"""Checkpoints that survive crashes: atomic writes, one previous copy, and safe loading.

A checkpoint is a dict of tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: no code runs from a checkpoint file. Writing goes to a temporary
file in the same folder, which is flushed to disk and then renamed over the target; the file it
replaces is kept as ``<name>.prev.pt``. A checkpoint cut short by ``kill -9`` or a full disk is thus
never the only copy: :func:`load_checkpoint` reports it and falls back to the previous one.

Each checkpoint carries a ``checksum``: the SHA-256 of its content (:func:`metagrad.data._io.content_digest`),
verified on load, so flipped bits on disk are an unreadable checkpoint, not silently different numbers.
Checkpoints written before checksums existed (the published ``results/*/best.pt``) load as legacy files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad.data._io import content_digest, save_tensors
from metagrad.data.datasets import FewShotDataset
from metagrad.errors import ConfigError, DataError, FileError, TrainingError, describe_os_error
from metagrad.training.config import CONFIG_NAME, Config, _flatten, config_to_dict
from metagrad.types import Params

__all__ = ["FORMAT_VERSION", "MODEL_SETTINGS", "RunState", "capture_rng_state", "check_model_settings",
           "check_same_data", "data_fingerprint", "load_checkpoint", "previous_path", "restore_params",
           "restore_rng_state", "save_checkpoint"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when the checkpoint layout changes incompatibly."""

CHECKSUM_KEY = "checksum"


def previous_path(path: Path) -> Path:
    """Where the copy a new checkpoint replaced is kept: ``latest.pt`` -> ``latest.prev.pt``."""
    return path.with_suffix(".prev" + path.suffix)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` atomically to ``path``, keeping the file it replaces as ``<name>.prev.pt``.

    Args:
        state: tensors and plain Python values only (dicts, lists, tuples, numbers, strings, None); a
            ``checksum`` of this content is added.
        path: target file; its folder must exist.

    Raises:
        FileError: the file cannot be written (full disk, read-only folder...); the previous
            checkpoint is left as it was.
    """
    path = Path(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            save_tensors({**state, CHECKSUM_KEY: content_digest(state)}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp_name, path)
    except BaseException as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise FileError(describe_os_error(exc, "write the checkpoint", path)) from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the renames durable on power loss; not possible on every platform, harmless to skip there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Load a checkpoint, falling back to ``<name>.prev.pt`` when ``path`` is missing or unreadable.

    Args:
        path: the checkpoint, e.g. ``RUN_DIR/latest.pt``.

    Returns:
        The checkpoint dict (tensors on CPU), or None when neither file exists.

    Raises:
        TrainingError: the files exist but none of them loads (each problem is named).
    """
    path = Path(path)
    problems = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            if not candidate.is_file():  # a FIFO would block the read, /dev/zero never end it
                raise ValueError("not a regular file")
            state = torch.load(candidate, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
                raise ValueError(f"not a metagrad checkpoint of format {FORMAT_VERSION}")
            _verify_checksum(state)
        # any failure to read means "unreadable": a truncated zip, a pickle refused by weights_only, garbage
        except Exception as exc:  # noqa: BLE001
            reason = f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
            logger.warning("checkpoint %s is unreadable (%s)", candidate, reason)
            problems.append(f"{candidate} ({reason})")
            continue
        if problems:
            logger.warning("using the previous checkpoint %s (iteration %s)", candidate,
                           state.get("iteration"))
        return state
    if problems:
        raise TrainingError("no readable checkpoint: " + "; ".join(problems))
    return None


def _verify_checksum(state: dict[str, Any]) -> None:
    """Remove and check ``state``'s checksum; a checkpoint without one is a legacy file, accepted."""
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is None:
        return
    if expected != content_digest(state):
        raise ValueError("its content does not match its checksum (the file was altered or damaged on disk)")


def capture_rng_state(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, Any]:
    """Every random state a run depends on: torch's global CPU RNG, the task generators, CUDA's RNG."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(
    state: dict[str, Any], generators: dict[str, torch.Generator], device: torch.device
) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclasses.dataclass
class RunState:
    """What a checkpoint records about the run besides tensors."""

    iteration: int = 0
    best_val_accuracy: float | None = None
    best_iteration: int | None = None
    elapsed_s: float = 0.0  # wall time of the iterations done so far, over every resume


MODEL_SETTINGS = ("data.dataset", "data.ways", "data.rotations", "model.name", "model.hidden_size",
                  "model.strided", "model.norm_init", "meta.per_step_bn")
"""The settings a checkpoint's parameters depend on: a checkpoint fits only a config that agrees on them."""


def restore_params(params: Params, checkpoint: dict[str, Any], path: Path, config: Config) -> None:
    """Copy a checkpoint's parameters into ``params``, after checking that they belong to this model.

    Raises:
        ConfigError: the checkpoint was trained with other :data:`MODEL_SETTINGS` than ``config``, or a
            parameter is missing, unknown or of another shape (the message names it).
        TrainingError: the checkpoint holds no parameters, or NaN or infinite ones.
    """
    where = path.parent / CONFIG_NAME
    check_model_settings(checkpoint, path, config)
    saved = checkpoint.get("params")
    if not isinstance(saved, dict) or not all(isinstance(t, Tensor) for t in saved.values()):
        raise TrainingError(f"{path} holds no parameters: it is damaged or not a metagrad checkpoint")
    unknown, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
    if unknown or missing:
        what = (f"has a parameter {unknown[0]!r} that the model of {where} lacks" if unknown
                else f"lacks the parameter {missing[0]!r} of the model of {where}")
        raise ConfigError(f"{path} {what} ({config.model.name}): the checkpoint comes from another model; "
                          "restore the run's config.json or use another checkpoint")
    for name, tensor in saved.items():
        if tensor.shape != params[name].shape:
            raise ConfigError(
                f"{path} does not fit the model of {where}: parameter {name} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(params[name].shape)} with "
                f"data.ways={config.data.ways}, "
                f"model.hidden_size={config.model.hidden_size}; restore the settings it was trained with"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{path} holds NaN or infinite values in {name}: it comes from a diverged "
                                "run; use another checkpoint")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def check_model_settings(checkpoint: dict[str, Any], path: Path, config: Config) -> None:
    """Raise ConfigError naming the first of :data:`MODEL_SETTINGS` in which the config the checkpoint
    was trained with (when it records one) differs from ``config``."""
    saved_config = checkpoint.get("config")
    if not isinstance(saved_config, dict):
        return  # best.pt before it recorded its config: restore_params checks the shapes
    where = path.parent / CONFIG_NAME
    ours, theirs = _flatten(config_to_dict(config)), _flatten(saved_config)
    for key in MODEL_SETTINGS:
        if key in theirs and theirs[key] != ours[key]:
            raise ConfigError(
                f"{path} was trained with {key}={theirs[key]!r} but {where} says {ours[key]!r}: they do not "
                f"fit together; restore {key} in {where} (or use the checkpoint of that run)"
            )


def data_fingerprint(datasets: dict[str, FewShotDataset]) -> dict[str, dict[str, Any]]:
    """What a run's data is, per split, for its checkpoints: the counts, the image shape and SHA-256
    digests of the class names and of the images (``_io.content_digest``: the decoded tensor, so the same
    data gives the same fingerprint wherever it was read or cached)."""
    return {split: {"classes": dataset.num_classes, "images_per_class": dataset.images_per_class,
                    "image_shape": list(dataset.image_shape),
                    "class_names": content_digest(list(dataset.class_names)),
                    "images": content_digest(dataset.images)}
            for split, dataset in datasets.items()}


def check_same_data(checkpoint: dict[str, Any], fingerprint: dict[str, dict[str, Any]], path: Path) -> None:
    """Refuse to resume from ``checkpoint`` on other data than the run started with, naming what changed.

    A checkpoint without a fingerprint (written before metagrad recorded one) is accepted.

    Raises:
        DataError: a split has other classes, another count, another image shape or other images.
    """
    saved = checkpoint.get("data")
    if not isinstance(saved, dict):
        return
    fix = ("restore the data the run started with (the same folder, files and options), or start a new run "
           "(--overwrite or another --run-dir)")
    for split, now in fingerprint.items():
        then = saved.get(split)
        if not isinstance(then, dict):
            continue
        what = None
        for key, says in (("classes", "{} classes"), ("images_per_class", "{} images per class"),
                          ("image_shape", "images of shape {}")):
            if then.get(key) != now[key]:
                what = f"has {says.format(now[key])}, but {then.get(key)} when the run started"
                break
        else:
            if then.get("class_names") != now["class_names"]:
                what = "has other classes (other names) than when the run started"
            elif then.get("images") != now["images"]:
                what = "has other images than when the run started (the same classes)"
        if what is not None:
            raise DataError(f"cannot resume from {path}: the {split} split {what}; {fix}")
