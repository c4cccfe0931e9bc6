"""metagrad: fast, correct gradient-based meta-learning for few-shot vision.

The public API in one place::

    import metagrad as mg

    train = mg.load_dataset("omniglot", "train", data_dir="DATA")
    sampler = mg.EpisodeSampler(train, ways=5, shots=1, query_shots=1)
    model = mg.build_model("omniglot-cnn", ways=5)
    params = dict(model.named_parameters())
    episode = sampler.sample(32, generator)                    # a meta-batch of 32 tasks
    out = mg.meta_batch_loss(mg.MAML(inner_lr=0.4, inner_steps=1), model, params, {}, episode)
    out.loss.backward()                                        # exact second-order meta-gradient

Experiments (run folders, checkpoints, presets) live in :mod:`metagrad.training`; the
learn2learn-compatible layer in :mod:`metagrad.compat.learn2learn`.

Importing metagrad changes nothing in the process (environment, threads, allocator). The names below
load on first use, so that the ``metagrad`` command (``metagrad/__main__.py``), or a script's first line
``metagrad.tune_process()``, can set OpenMP's wait policy before anything imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "ALGORITHMS": "metagrad.algorithms",
    "ANIL": "metagrad.algorithms",
    "Algorithm": "metagrad.algorithms",
    "MAML": "metagrad.algorithms",
    "make": "metagrad.algorithms",
    "MetaBatchOutput": "metagrad.algorithms",
    "check_model": "metagrad.algorithms",
    "evaluate": "metagrad.algorithms",
    "evaluate_with_losses": "metagrad.algorithms",
    "meta_batch_loss": "metagrad.algorithms",
    "meta_train_step": "metagrad.algorithms",
    "EpisodeSampler": "metagrad.data",
    "FewShotDataset": "metagrad.data",
    "dataset_info": "metagrad.data",
    "load_dataset": "metagrad.data",
    "ConfigError": "metagrad.errors",
    "DataError": "metagrad.errors",
    "MetagradError": "metagrad.errors",
    "TrainingError": "metagrad.errors",
    "adapt": "metagrad.functional",
    "forward_with": "metagrad.functional",
    "inner_step": "metagrad.functional",
    "build_model": "metagrad.models",
    "Buffers": "metagrad.types",
    "Episode": "metagrad.types",
    "Params": "metagrad.types",
}

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "MAML",
    "Algorithm",
    "Buffers",
    "ConfigError",
    "DataError",
    "Episode",
    "EpisodeSampler",
    "FewShotDataset",
    "MetaBatchOutput",
    "MetagradError",
    "Params",
    "TrainingError",
    "__version__",
    "adapt",
    "build_model",
    "check_model",
    "dataset_info",
    "evaluate",
    "evaluate_with_losses",
    "forward_with",
    "inner_step",
    "load_dataset",
    "make",
    "meta_batch_loss",
    "meta_train_step",
    "tune_process",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from metagrad.algorithms import (
        ALGORITHMS,
        ANIL,
        MAML,
        Algorithm,
        MetaBatchOutput,
        check_model,
        evaluate,
        evaluate_with_losses,
        make,
        meta_batch_loss,
        meta_train_step,
    )
    from metagrad.data import EpisodeSampler, FewShotDataset, dataset_info, load_dataset
    from metagrad.errors import ConfigError, DataError, MetagradError, TrainingError
    from metagrad.functional import adapt, forward_with, inner_step
    from metagrad.models import build_model
    from metagrad.types import Buffers, Episode, Params


def tune_process() -> None:
    """Give a script the ``metagrad`` command's process settings: OpenMP threads that sleep after 1,000
    spins (``GOMP_SPINCOUNT``), so that a step keeps its speed beside another busy process, and with
    ``METAGRAD_MALLOC=huge`` torch's huge pages. Call it first, before torch is imported (libgomp reads
    its settings once, when torch loads); a variable you set yourself wins.

    Raises:
        RuntimeError: torch is already imported, so the settings could no longer take effect.
    """
    import sys

    if "torch" in sys.modules:
        raise RuntimeError("call metagrad.tune_process() before importing torch (or anything that imports "
                           "it): OpenMP reads its settings once, when torch loads")
    from metagrad.__main__ import tune_before_torch

    tune_before_torch()


def __getattr__(name: str) -> Any:
    """Imports a public name's module on first use (PEP 562) and caches the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'metagrad' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
