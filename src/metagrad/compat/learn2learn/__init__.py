"""A learn2learn-compatible layer: replace ``import learn2learn as l2l`` with
``import metagrad.compat.learn2learn as l2l`` and scripts written for learn2learn 0.2.0 run unchanged.

Provided: ``l2l.algorithms`` (``MAML``, ``MetaSGD``, ``maml_update``); ``l2l.clone_module`` /
``update_module`` / ``detach_module`` / ``clone_parameters``, ``l2l.accuracy``, ``l2l.magic_box`` (also
under ``l2l.utils``); ``l2l.nn`` (``Lambda``, ``Flatten``); ``l2l.data`` (``MetaDataset``,
``UnionMetaDataset``, ``FilteredMetaDataset``, ``OnDeviceDataset``, ``Taskset`` / ``TaskDataset``, the task
transforms, ``partition_task``, ``InfiniteIterator``); ``l2l.vision`` (datasets
``FullOmniglot`` / ``MiniImagenet`` / ``CIFARFS`` / ``FC100`` / ``TieredImagenet`` / ``CUBirds200``,
``transforms.RandomClassRotation``, models ``OmniglotCNN`` / ``OmniglotFC`` / ``CNN4`` / ``MiniImagenetCNN``,
``benchmarks.get_tasksets`` for learn2learn's "omniglot", "mini-imagenet", "tiered-imagenet", "fc100",
"cifarfs", and "cub", a metagrad extension); ``l2l.__version__`` is the learn2learn version followed.
docs/MIGRATION.md lists every name, what differs and why, and what is not provided; looking up a name
that is not raises an ``AttributeError`` that says what to use instead.
"""

from metagrad.compat.learn2learn import algorithms, data, nn, utils, vision
from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.utils import (
    accuracy,
    clone_module,
    clone_parameters,
    detach_module,
    magic_box,
    update_module,
)

__version__ = "0.2.0"
"""The learn2learn release whose names, signatures and semantics this layer follows (metagrad's own
version is ``metagrad.__version__``)."""

__all__ = ["__version__", "accuracy", "algorithms", "clone_module", "clone_parameters", "data",
           "detach_module", "magic_box", "nn", "update_module", "utils", "vision"]

_NOT_PROVIDED = {
    "optim": "learnable update rules are not provided; adapt with l2l.algorithms.MAML or MetaSGD",
    "gym": "reinforcement-learning environments are not provided (metagrad is few-shot vision)",
    "text": "text datasets are not provided (metagrad is few-shot vision)",
    "clone_named_parameters": utils._NOT_PROVIDED["clone_named_parameters"],
    "clone_distribution": utils._NOT_PROVIDED["clone_distribution"],
    "detach_distribution": utils._NOT_PROVIDED["detach_distribution"],
    "flatten_config": utils._NOT_PROVIDED["flatten_config"],
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
