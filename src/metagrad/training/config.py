"""Experiment configuration: one frozen dataclass per concern, named presets, files and overrides.

A configuration is resolved in this order, each layer overriding the one before:

1. the dataclass defaults below (the MAML paper's Omniglot 5-way 1-shot settings);
2. a named preset from ``src/metagrad/configs/<name>.toml`` (``--preset``);
3. a config file, TOML or the ``config.json`` a run folder holds (``--config``);
4. single options (``--inner-lr 0.1``, ``--set meta.inner_lr=0.1``).

Every value is checked once, in :func:`validate_config`; a bad one raises
:class:`~metagrad.errors.ConfigError` with a message that says what to change.

Example:
    >>> from metagrad.training import load_preset
    >>> config = load_preset("omniglot-maml-20w1s")
    >>> config.meta.inner_lr, config.meta.meta_batch_size
    (0.1, 16)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from metagrad.algorithms.base import Algorithm
from metagrad.algorithms.registry import ALGORITHMS, check_algorithm
from metagrad.data._io import write_text_atomically
from metagrad.data.datasets import DATASETS
from metagrad.data.folder import check_folder_name
from metagrad.errors import ConfigError, FileError, describe_os_error
from metagrad.models import MODELS, NORM_INIT_MODELS
from metagrad.models.layers import check_norm_init

__all__ = [
    "CONFIG_NAME",
    "DATASET_DEFAULTS",
    "DEFAULT_PRESET",
    "LEARNED_INNER_LRS",
    "LOGGERS",
    "LR_SCHEDULES",
    "RESUMABLE_CHANGES",
    "Config",
    "DataConfig",
    "MetaConfig",
    "ModelConfig",
    "RunConfig",
    "absolute_folders",
    "algorithm_settings",
    "check_resume_compatible",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config_file",
    "load_preset",
    "logger_names",
    "parse_assignment",
    "preset_source",
    "resolve_config",
    "save_config",
    "validate_config",
]

CONFIG_NAME = "config.json"
"""A run folder's config file: ``metagrad train --config RUN/config.json`` repeats the run."""

DEFAULT_PRESET = "omniglot-maml-5w1s"
"""The preset ``metagrad train`` uses when given none: the README's main job."""

LR_SCHEDULES = ("constant", "cosine", "linear")

LOGGERS = ("tensorboard", "wandb")
"""Where ``run.loggers`` mirrors the metric rows besides metrics.jsonl (each an optional extra:
``pip install "metagrad[tensorboard]"``); see :mod:`metagrad.training.loggers`."""

MAX_CONFIG_BYTES = 1 << 20
"""A config file is a few hundred bytes; a larger one is the wrong file, read no further."""

LEARNED_INNER_LRS = ("none", "per-parameter", "per-layer-per-step")
"""``meta.learned_inner_lr``: "none" (``inner_lr`` is a fixed number), "per-parameter" (Meta-SGD: a
meta-learned rate tensor of each parameter's shape) or "per-layer-per-step" (MAML++'s LSLR: a learned
scalar per parameter tensor and inner step, starting at ``inner_lr``); learned rates are optimized by
Adam beside the parameters."""

SPLIT_SCHEMES = {name: spec.options["split_scheme"] for name, spec in DATASETS.items()}
"""Class splits each dataset offers, as its loader declares them (Mini-ImageNet: Ravi & Larochelle's only)."""

DATASET_DEFAULTS = {
    "omniglot": {"split_scheme": "shuffled", "rotations": True},  # MAML's protocol
    "mini-imagenet": {"split_scheme": "ravi", "rotations": False},
    "folder": {"split_scheme": "folders", "rotations": False},  # your own split folders, as they are
    "cifar-fs": {"split_scheme": "bertinetto", "rotations": False},
    "fc100": {"split_scheme": "oreshkin", "rotations": False},
    "tiered-imagenet": {"split_scheme": "ren", "rotations": False},
    "cub": {"split_scheme": "chen", "rotations": False},  # Chen et al. 2019's 100/50/50, the presets'
}
"""The data settings that belong to a dataset: a config that names another dataset than its preset's
takes these for the ones it does not set itself (``--preset omniglot-maml-5w1s --set data.dataset=folder``
needs no ``split_scheme`` or ``rotations``)."""

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and the shape of each few-shot task."""

    dataset: str = "omniglot"  # a name in metagrad.data.datasets.DATASETS
    data_dir: str | None = None  # None: $METAGRAD_DATA, else the default user folder
    cache_dir: str | None = None  # None: $METAGRAD_CACHE, else $XDG_CACHE_HOME/metagrad
    ways: int = 5  # N: classes per task
    shots: int = 1  # K: support samples per class
    query_shots: int = 1  # Q: query samples per class (MAML on Omniglot: Q = K)
    rotations: bool = True  # Omniglot only: 0/90/180/270-degree rotations are 4 distinct classes (MAML)
    split_scheme: str = "shuffled"  # Omniglot: "shuffled", "maml", "vinyals"; Mini-ImageNet: "ravi";
    # CUB: "chen", "triantafillou"; CIFAR-FS: "bertinetto"; FC100: "oreshkin"; tiered-ImageNet: "ren"
    train_shots: int = 0  # support samples per class of training tasks (Reptile's train shots); 0: shots
    folder: str | None = None  # dataset "folder" only: your dataset's folder, data_dir/<folder>/{train,...}


@dataclass(frozen=True)
class ModelConfig:
    """The network meta-learned. Its classifier head is ``classifier.*`` (what ANIL adapts)."""

    name: str = "omniglot-cnn"  # a name in metagrad.models.build_model
    hidden_size: int = 64  # filters per conv layer (MAML: 64 on Omniglot, 32 on Mini-ImageNet)
    strided: bool = True  # omniglot-cnn only: stride-2 convs instead of max-pooling (MAML on Omniglot)
    norm_init: str = "learn2learn"  # conv models: BatchNorm weight starts U[0, 1) ("learn2learn") or at 1
    #                                 ("ones"; MAML's TensorFlow code has no BatchNorm scale: 1 throughout)


@dataclass(frozen=True)
class MetaConfig:
    """The meta-learning algorithm and both optimization loops."""

    algorithm: str = "maml"  # a name in metagrad.algorithms.ALGORITHMS: maml, anil, boil, reptile
    first_order: bool = False  # drop second-order terms of the meta-gradient (first-order MAML, ANIL, BOIL)
    inner_lr: float = 0.4  # step size of the inner (adaptation) SGD loop (learned rates: where they start)
    learned_inner_lr: str = "none"  # "none", "per-parameter" (Meta-SGD: a learned rate per element) or
    #                                "per-layer-per-step" (MAML++'s LSLR: per parameter tensor and inner step)
    inner_lr_init_low: float | None = None  # per-parameter only: rates start U[low, inner_lr); None: at
    #                                          inner_lr (learn2learn's MetaSGD: lr times ones)
    inner_steps: int = 1  # inner SGD steps during meta-training
    test_inner_steps: int = 10  # inner SGD steps on validation and test tasks
    meta_lr: float = 0.001  # Adam learning rate of the outer loop
    meta_batch_size: int = 32  # tasks per outer step
    iterations: int = 60_000  # outer steps
    lr_schedule: str = "constant"  # "constant", "cosine" or "linear" (annealed to min_meta_lr at the end)
    min_meta_lr: float = 0.0  # cosine and linear: where the meta learning rate anneals to (MAML++'s CA)
    iterations_per_epoch: int = 0  # 0: no epochs, schedules count iterations; N: an epoch is N iterations, as
    #                               MAML++'s code counts one (the cosine then steps once per epoch)
    first_order_epochs: int = 0  # MAML++'s DA: first order for the first E epochs, second order after
    msl_epochs: int = 0  # MAML++'s MSL: for the first E epochs the loss weighs the query losses after every
    #                     inner step, annealed towards the last one's (0: the last step's loss only)
    per_step_bn: bool = False  # MAML++'s BNWB: each BatchNorm weight and bias once per inner step (step k's
    #                           forwards use copy k, later test steps the last), meta-learned, not adapted
    inner_optimizer: str = "adam"  # reptile only: "adam" (beta1 = 0, the paper's code) or "sgd"
    inner_batch_size: int = 0  # reptile only: support samples per inner step, cycling; 0: all of them
    vectorize: bool = True  # one computation per meta-batch (batched or vmap); False: per-task loop
    tasks_per_chunk: int = 0  # 0: automatic (whole meta-batch on GPU, cache-sized chunks on CPU); N: at most
    #                          N tasks' graphs alive at once (lower peak memory, usually slower)


@dataclass(frozen=True)
class RunConfig:
    """Where the run goes and how it is monitored."""

    seed: int = 0  # seeds the model initialization and every task stream
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps"
    run_dir: str | None = None  # None: runs/<preset>-<timestamp>; not written to config.json
    eval_every: int = 500  # validate every this many iterations (and after the last one)
    eval_tasks: int = 100  # validation tasks per evaluation (the same tasks every time)
    test_tasks: int = 600  # meta-test tasks at the end (600 as in the papers)
    checkpoint_every: int = 500  # write latest.pt every this many iterations (and on SIGINT/SIGTERM)
    keep_best: int = 1  # keep this many best validation checkpoints (K > 1: in top/, for eval --ensemble K)
    log_every: int = 100  # without a terminal: one progress line every this many iterations
    dist_timeout_s: float = 600.0  # under torchrun: how long a process waits for the others, then fails
    loggers: str = ""  # also log to "tensorboard", "wandb" or "tensorboard,wandb"; "": the run folder only
    wandb_project: str | None = None  # W&B project; None: $WANDB_PROJECT, else "metagrad"


@dataclass(frozen=True)
class Config:
    """A whole experiment. ``preset`` names the preset it started from (for run folders and reports)."""

    preset: str = DEFAULT_PRESET
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "meta": MetaConfig, "run": RunConfig}

RESUMABLE_CHANGES = frozenset(
    {"data.data_dir", "data.cache_dir", "run.device", "run.run_dir", "run.checkpoint_every", "run.log_every",
     "run.dist_timeout_s", "run.loggers", "run.wandb_project"}
)
"""Settings ``--resume`` may change: they do not alter what the run computes (on one device type)."""


# --------------------------------------------------------------------------------------------------
# Presets and files
# --------------------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    """Names of the packaged presets, sorted."""
    folder = resources.files("metagrad") / "configs"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_source(name: str) -> str:
    """Where a preset's values come from, as its TOML header says: the paper's authors and year
    (``"Finn, Abbeel & Levine 2017"``), or ``"metagrad's own recipe"``.

    Raises:
        ConfigError: the name is unknown (the message lists the valid ones).
    """
    if name not in list_presets():
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())}")
    text = (resources.files("metagrad") / "configs" / f"{name}.toml").read_text(encoding="utf-8")
    cited = re.search(r"^# Source: (.+? \d{4})\b", text, re.MULTILINE)
    return cited.group(1) if cited else "metagrad's own recipe"


def load_preset(name: str) -> Config:
    """Load a packaged preset by name.

    Args:
        name: a preset name such as ``"omniglot-maml-5w1s"``; see :func:`list_presets`.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the name is unknown (the message lists the valid ones) or the preset is invalid.
    """
    return resolve_config(preset=name)


def _preset_dict(name: str) -> dict[str, Any]:
    presets = list_presets()
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(presets)}")
    text = (resources.files("metagrad") / "configs" / f"{name}.toml").read_text(encoding="utf-8")
    return _parse_toml(text, f"preset {name}")


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise ConfigError(f"{source} is nested too deeply to be a config file") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a config file into nested sections, unchecked (:func:`resolve_config` checks it).

    Args:
        path: a ``.toml`` file with ``[data]``, ``[model]``, ``[meta]``, ``[run]`` tables and an optional
            top-level ``preset = "..."``, or a run folder's ``config.json`` (the same keys as JSON).

    Returns:
        The file's content as a dict of sections.

    Raises:
        ConfigError: the file is missing or unreadable, or is neither TOML nor JSON.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, or a device such as /dev/zero that never ends
        raise ConfigError(f"config file {path} is not a regular file; pass a .toml or config.json file")
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes, more than a config file "
                          f"can be ({MAX_CONFIG_BYTES:,}); is it the right file?")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is dropped
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}): is it a config file? "
                          "Save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"config file {path} is nested too deeply to be a config file") from None
    else:
        content = _parse_toml(text, f"config file {path}")
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a table of sections, not {type(content).__name__}")
    return content


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as JSON (without ``run.run_dir``: a copy of the run goes to a new folder).

    Raises:
        FileError: the file cannot be written (any earlier file is left as it was).
    """
    data = config_to_dict(config)
    del data["run"]["run_dir"]
    try:
        write_text_atomically(Path(path), json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise FileError(describe_os_error(exc, "write", path)) from None


def absolute_folders(config: Config) -> Config:
    """``config`` with ``~`` expanded and its data, cache and run folders made absolute (from the current
    folder), so that a run's config.json works from any folder. Unset (None or empty) folders stay so."""

    def absolute(folder: str | None) -> str | None:
        return os.path.abspath(os.path.expanduser(folder)) if folder else folder

    data, run = config.data, config.run
    return dataclasses.replace(
        config,
        data=dataclasses.replace(data, data_dir=absolute(data.data_dir), cache_dir=absolute(data.cache_dir)),
        run=dataclasses.replace(run, run_dir=absolute(run.run_dir)),
    )


# --------------------------------------------------------------------------------------------------
# Dicts <-> dataclasses
# --------------------------------------------------------------------------------------------------


def config_to_dict(config: Config) -> dict[str, Any]:
    """``config`` as nested plain dicts (JSON-ready)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """Build a validated :class:`Config` from nested dicts; missing keys take the dataclass defaults.

    Raises:
        ConfigError: an unknown section or key, a value of the wrong type, or an invalid value.
    """
    return validate_config(_build(data, source))


def _build(data: dict[str, Any], source: str) -> Config:
    unknown = sorted(set(data) - set(_SECTIONS) - {"preset"})
    if unknown:
        raise ConfigError(
            f"unknown section {unknown[0]!r} in {source}; valid sections: preset, {', '.join(_SECTIONS)}"
        )
    sections = {}
    for name, cls in _SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of settings, not {values!r}")
        sections[name] = _build_section(cls, name, values, source)
    preset = data.get("preset", DEFAULT_PRESET)
    if not isinstance(preset, str):
        raise ConfigError(f"{source}: preset must be a string, got {preset!r}")
    if sections["meta"].algorithm == "fomaml":  # the old way to ask for first order: still loads
        sections["meta"] = dataclasses.replace(sections["meta"], algorithm="maml", first_order=True)
    return Config(preset=preset, **sections)


def _build_section(cls: type, section: str, values: dict[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"unknown setting {section}.{key} in {source}; valid [{section}] settings: {', '.join(names)}"
            )
        kwargs[key] = _check_type(f"{section}.{key}", value, hints[key], source)
    return cls(**kwargs)


def _check_type(name: str, value: Any, hint: Any, source: str) -> Any:
    """Return ``value`` if it fits ``hint`` (int for float is widened), else raise ConfigError."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        # bool is a subclass of int: "iterations = true" must not pass as 1.
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    wanted = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{name} must be {wanted}, got {value!r} (in {source})")



# --------------------------------------------------------------------------------------------------
# Resolution and validation
# --------------------------------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``--set`` text ``section.key=value``; the value is read as TOML (``0.1``, ``true``, ``"x"``).

    A value that is not valid TOML is taken as a plain string (``--set data.dataset=omniglot``).

    Raises:
        ConfigError: the text is not of the form ``section.key=value``.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1:
        raise ConfigError(f"--set expects SECTION.KEY=VALUE such as meta.inner_lr=0.1, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return key, value


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve a configuration: dataclass defaults < preset < config file < overrides.

    Args:
        preset: preset name; None takes the file's ``preset`` key, else :data:`DEFAULT_PRESET`.
        config_file: optional TOML or JSON file (see :func:`load_config_file`).
        overrides: dotted keys to values, e.g. ``{"meta.inner_lr": 0.1, "run.seed": 3}``.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: unknown preset, file, section or key; a wrong type; an invalid value.
    """
    file_data = load_config_file(config_file) if config_file is not None else {}
    if preset is None:
        preset = file_data.get("preset", DEFAULT_PRESET)
        if not isinstance(preset, str):
            raise ConfigError(f"config file {config_file}: preset must be a string, got {preset!r}")
    merged = _preset_dict(preset)
    merged["preset"] = preset
    preset_dataset = merged.get("data", {}).get("dataset", DataConfig.dataset)
    _merge(merged, {k: v for k, v in file_data.items() if k != "preset"})
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(
                f"unknown setting {dotted!r}; settings are SECTION.KEY with SECTION one of "
                f"{', '.join(_SECTIONS)}"
            )
        if not isinstance(merged.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table of settings, not {merged[section]!r} "
                              f"(in {config_file})")
        merged[section][key] = value
    _dataset_defaults(merged, preset_dataset, file_data, overrides or {})
    source = f"preset {preset}" + (f" + {config_file}" if config_file is not None else "")
    return validate_config(_build(merged, source))


def _dataset_defaults(merged: dict[str, Any], preset_dataset: str, file_data: dict[str, Any],
                      overrides: dict[str, Any]) -> None:
    """When the dataset is not the preset's, the settings of :data:`DATASET_DEFAULTS` that neither the file
    nor an override sets become the new dataset's (the preset's belong to its own dataset)."""
    data = merged.get("data")
    if not isinstance(data, dict) or data.get("dataset", preset_dataset) == preset_dataset:
        return
    file_section = file_data.get("data")
    chosen = set(file_section) if isinstance(file_section, dict) else set()
    chosen |= {key.partition(".")[2] for key in overrides if key.startswith("data.")}
    for key, value in DATASET_DEFAULTS.get(data["dataset"], {}).items():
        if key not in chosen:
            data[key] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value


def _positive(name: str, value: float, hint: str = "") -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be positive, got {value}{hint}")


def validate_config(config: Config) -> Config:
    """Check every value of ``config``; return it unchanged when valid.

    Task shapes are checked against the dataset itself later, when the data is loaded
    (``EpisodeSampler`` raises for more ways than a split has classes).

    Raises:
        ConfigError: the first invalid value, with what to change.
    """
    data, model, meta, run = config.data, config.model, config.meta, config.run
    if data.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {data.dataset!r}; valid datasets: {', '.join(DATASETS)}")
    for name in ("ways", "shots", "query_shots"):
        _positive(f"data.{name} (--{name.replace('_', '-')})", getattr(data, name))
    schemes = SPLIT_SCHEMES[data.dataset]
    if data.split_scheme not in schemes:
        raise ConfigError(
            f"data.split_scheme {data.split_scheme!r} is not one of {data.dataset}'s: {', '.join(schemes)}"
        )
    if data.rotations and data.dataset != "omniglot":
        raise ConfigError(f"data.rotations applies to omniglot only; set it to false for {data.dataset}")
    if (data.folder is not None) != (data.dataset == "folder"):
        raise ConfigError("data.folder names your dataset's folder and goes with data.dataset = \"folder\" "
                          f"(got dataset {data.dataset!r} and folder {data.folder!r})")
    if data.folder is not None:
        check_folder_name(data.folder)

    if model.name not in MODELS:
        raise ConfigError(f"unknown model {model.name!r}; valid models: {', '.join(MODELS)}")
    _positive("model.hidden_size", model.hidden_size)
    if model.strided and model.name != "omniglot-cnn":
        raise ConfigError(f"model.strided applies to omniglot-cnn only; set it to false for {model.name}")
    check_norm_init(model.norm_init, "model.norm_init")
    if model.norm_init != "learn2learn" and model.name not in NORM_INIT_MODELS:
        names = f"{', '.join(NORM_INIT_MODELS[:-1])} and {NORM_INIT_MODELS[-1]}"
        raise ConfigError(f"model.norm_init applies to {names} only ({model.name}'s "
                          f"BatchNorm weights start at 1); leave it at learn2learn")

    check_algorithm(meta.algorithm)
    if data.train_shots < 0:
        raise ConfigError(f"data.train_shots must be >= 0 (0: as data.shots), got {data.train_shots}")
    _positive("meta.inner_lr (--inner-lr)", meta.inner_lr)
    _check_learned_inner_lr(meta)
    _positive("meta.meta_lr (--meta-lr)", meta.meta_lr)
    for name in ("inner_steps", "test_inner_steps", "meta_batch_size", "iterations"):
        _positive(f"meta.{name} (--{name.replace('_', '-')})", getattr(meta, name))
    own = algorithm_settings(meta)
    for key in ("inner_optimizer", "inner_batch_size"):
        if key not in own and getattr(meta, key) != getattr(MetaConfig, key):
            takers = ", ".join(name for name, cls in ALGORITHMS.items() if key in cls.__dataclass_fields__)
            raise ConfigError(f"meta.{key} is a setting of {takers} only; drop it for {meta.algorithm}")
    ALGORITHMS[meta.algorithm](inner_lr=meta.inner_lr, inner_steps=meta.inner_steps, **own)  # its own checks
    if meta.tasks_per_chunk < 0:
        raise ConfigError(
            f"meta.tasks_per_chunk (--tasks-per-chunk) must be 0 (automatic) or a number of tasks, "
            f"got {meta.tasks_per_chunk}"
        )
    if meta.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {meta.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    _check_epochs(meta)

    if not 0 <= run.seed < 2**63:
        raise ConfigError(f"run.seed (--seed) must be in [0, 2**63), got {run.seed}")
    if not _DEVICE_PATTERN.match(run.device):
        raise ConfigError(f"unknown device {run.device!r}; use auto, cpu, cuda, cuda:N or mps")
    for name in ("eval_every", "eval_tasks", "checkpoint_every", "log_every"):
        _positive(f"run.{name} (--{name.replace('_', '-')})", getattr(run, name))
    _positive("run.dist_timeout_s (--dist-timeout)", run.dist_timeout_s)
    _positive("run.keep_best (--set run.keep_best=K)", run.keep_best, " (1 keeps best.pt alone)")
    logger_names(run.loggers)
    if run.wandb_project is not None and not run.wandb_project.strip():
        raise ConfigError("run.wandb_project is empty; name a W&B project or leave it unset")
    if run.test_tasks < 2:
        raise ConfigError(
            f"run.test_tasks (--test-tasks) must be at least 2 (a confidence interval needs 2 tasks), "
            f"got {run.test_tasks}"
        )
    return config


def logger_names(text: str) -> tuple[str, ...]:
    """The loggers a comma-separated ``run.loggers`` names (``"tensorboard,wandb"``), in :data:`LOGGERS`
    order; ``""`` names none.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(LOGGERS))
    if unknown:
        raise ConfigError(f"unknown logger {unknown[0]!r} in run.loggers (--logger); valid: "
                          f"{', '.join(LOGGERS)}, or both comma-separated")
    return tuple(name for name in LOGGERS if name in names)


def _check_learned_inner_lr(meta: MetaConfig) -> None:
    if meta.learned_inner_lr not in LEARNED_INNER_LRS:
        raise ConfigError(f"unknown meta.learned_inner_lr {meta.learned_inner_lr!r}; valid: "
                          f"{', '.join(LEARNED_INNER_LRS)}")
    low = meta.inner_lr_init_low
    if low is not None and meta.learned_inner_lr != "per-parameter":
        raise ConfigError("meta.inner_lr_init_low sets where Meta-SGD's rates start: it needs "
                          "meta.learned_inner_lr = \"per-parameter\" (or drop it)")
    if low is not None and not (math.isfinite(low) and 0 <= low < meta.inner_lr):
        raise ConfigError(f"meta.inner_lr_init_low must be in [0, meta.inner_lr={meta.inner_lr}) (the rates "
                          f"start uniform between them), got {low}")


def _check_epochs(meta: MetaConfig) -> None:
    if meta.min_meta_lr != 0 and meta.lr_schedule == "constant":
        raise ConfigError("meta.min_meta_lr is where an annealed schedule ends: set meta.lr_schedule = "
                          "\"cosine\" (--lr-schedule cosine) or drop it")
    if not (math.isfinite(meta.min_meta_lr) and 0 <= meta.min_meta_lr < meta.meta_lr):
        raise ConfigError(f"meta.min_meta_lr must be in [0, meta.meta_lr={meta.meta_lr}), "
                          f"got {meta.min_meta_lr}")
    if meta.iterations_per_epoch < 0:
        raise ConfigError(f"meta.iterations_per_epoch must be 0 (no epochs) or a number of iterations, got "
                          f"{meta.iterations_per_epoch}")
    if meta.first_order_epochs < 0:
        raise ConfigError(f"meta.first_order_epochs must be >= 0, got {meta.first_order_epochs}")
    if meta.first_order_epochs and not meta.iterations_per_epoch:
        raise ConfigError("meta.first_order_epochs counts epochs: set meta.iterations_per_epoch (MAML++'s "
                          "code: 500) or drop it")
    if meta.msl_epochs < 0:
        raise ConfigError(f"meta.msl_epochs must be >= 0, got {meta.msl_epochs}")
    if meta.msl_epochs and not meta.iterations_per_epoch:
        raise ConfigError("meta.msl_epochs counts epochs: set meta.iterations_per_epoch (MAML++'s code: 500) "
                          "or drop it")
    if meta.first_order_epochs and meta.first_order:
        raise ConfigError("meta.first_order_epochs switches first-order training to second order after those "
                          "epochs, but meta.first_order is true throughout: drop one of them")


def check_resume_compatible(saved: Config, requested: Config) -> None:
    """Raise unless ``requested`` differs from ``saved`` only in :data:`RESUMABLE_CHANGES`.

    Raises:
        ConfigError: naming the first setting that a resumed run cannot change.
    """
    old, new = _flatten(config_to_dict(saved)), _flatten(config_to_dict(requested))
    for key in old:
        if old[key] != new[key] and key not in RESUMABLE_CHANGES:
            raise ConfigError(
                f"cannot change {key} when resuming (the run used {old[key]!r}, got {new[key]!r}); "
                f"drop the option, or start a new run in another --run-dir"
            )


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def algorithm_settings(meta: MetaConfig) -> dict[str, Any]:
    """The settings ``meta.algorithm`` has beyond every algorithm's (e.g. Reptile's inner batch size),
    read from the ``meta`` keys of the same names."""
    common = {f.name for f in dataclasses.fields(Algorithm)}
    return {f.name: getattr(meta, f.name) for f in dataclasses.fields(ALGORITHMS[meta.algorithm])
            if f.name not in common and hasattr(meta, f.name)}
