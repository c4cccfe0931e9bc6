"""metagrad: fast, correct gradient-based meta-learning for few-shot vision.

The public API in one place::

    import metagrad as mg

    train = mg.load_dataset("omniglot", "train", data_dir="DATA")
    sampler = mg.EpisodeSampler(train, ways=5, shots=1, query_shots=1)
    model = mg.build_model("omniglot-cnn", ways=5)
    params = dict(model.named_parameters())
    episode = sampler.sample(32, generator)                    # a meta-batch of 32 tasks
    out = mg.meta_batch_loss("maml", model, params, {}, episode, inner_lr=0.4, inner_steps=1)
    out.loss.backward()                                        # exact second-order meta-gradient

Experiments (run folders, checkpoints, presets) live in :mod:`metagrad.training`; the
learn2learn-compatible layer in :mod:`metagrad.compat.learn2learn`.
"""

import metagrad._openmp  # noqa: F401  (first: it must run before anything imports torch)
from metagrad.algorithms import (
    ALGORITHMS,
    MetaBatchOutput,
    check_model,
    evaluate,
    evaluate_with_losses,
    meta_batch_loss,
    meta_train_step,
)
from metagrad.data import EpisodeSampler, FewShotDataset, dataset_info, load_dataset
from metagrad.errors import ConfigError, DataError, MetagradError, TrainingError
from metagrad.functional import adapt, forward_with, inner_step
from metagrad.models import build_model
from metagrad.types import Buffers, Episode, Params

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
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
    "meta_batch_loss",
    "meta_train_step",
]
