"""A learn2learn-compatible layer: replace ``import learn2learn as l2l`` with
``import metagrad.compat.learn2learn as l2l`` and scripts written for learn2learn 0.2.0 run unchanged.

Provided: ``l2l.algorithms`` (``MAML``, ``MetaSGD``, ``maml_update``); ``l2l.clone_module`` /
``update_module`` / ``detach_module`` / ``clone_parameters``; ``l2l.data`` (``MetaDataset``,
``UnionMetaDataset``, ``FilteredMetaDataset``, ``OnDeviceDataset``, ``Taskset`` / ``TaskDataset``, the task
transforms, ``partition_task``, ``InfiniteIterator``); ``l2l.vision`` (datasets
``FullOmniglot`` / ``MiniImagenet``, ``transforms.RandomClassRotation``, models ``OmniglotCNN`` /
``OmniglotFC`` / ``CNN4`` / ``MiniImagenetCNN``, ``benchmarks.get_tasksets`` for "omniglot" and
"mini-imagenet"). docs/MIGRATION.md lists every name, what differs and why, and what is not provided.
"""

from metagrad.compat.learn2learn import algorithms, data, vision
from metagrad.compat.learn2learn.utils import clone_module, clone_parameters, detach_module, update_module

__all__ = ["algorithms", "clone_module", "clone_parameters", "data", "detach_module", "update_module",
           "vision"]
