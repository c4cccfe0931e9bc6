"""A learn2learn-compatible layer: replace ``import learn2learn as l2l`` with
``import metagrad.compat.learn2learn as l2l`` and learn2learn's MAML vision examples run unchanged.

Provided: ``l2l.algorithms.MAML``, ``l2l.vision.models.OmniglotCNN`` / ``OmniglotFC`` /
``MiniImagenetCNN`` and ``l2l.vision.benchmarks.get_tasksets`` for "omniglot" and "mini-imagenet".
Everything is a thin layer over metagrad's functional core, models and data.
"""

from metagrad.compat.learn2learn import algorithms, vision

__all__ = ["algorithms", "vision"]
