"""Experiments: configs and presets, the meta-training loop, checkpoints, evaluation and reports.

Example:
    >>> from metagrad.training import load_preset, run
    >>> results = run(load_preset("omniglot-maml-5w1s"))
    >>> results["test_accuracy"], results["test_ci95"]
"""

from metagrad.training.config import (
    Config,
    DataConfig,
    MetaConfig,
    ModelConfig,
    RunConfig,
    list_presets,
    load_preset,
    resolve_config,
)
from metagrad.training.evaluation import evaluate_checkpoint
from metagrad.training.loop import run
from metagrad.training.metrics import mean_ci95
from metagrad.training.signals import TrainingInterrupted

__all__ = [
    "Config",
    "DataConfig",
    "MetaConfig",
    "ModelConfig",
    "RunConfig",
    "TrainingInterrupted",
    "evaluate_checkpoint",
    "list_presets",
    "load_preset",
    "mean_ci95",
    "resolve_config",
    "run",
]
