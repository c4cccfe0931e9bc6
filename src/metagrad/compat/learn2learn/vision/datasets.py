"""``l2l.vision.datasets.FullOmniglot`` and ``MiniImagenet`` over metagrad's decoded, cached image tensors.

Both are :class:`~metagrad.compat.learn2learn.data.ClassImages`: ``dataset[i] -> (image tensor, label)``,
so a ``Taskset`` over them draws tasks by tensor indexing. Differences from learn2learn: images are
already tensors (Omniglot: (1, 28, 28) in [0, 1], ink = 1, resized with Lanczos as learn2learn's
benchmark does; Mini-ImageNet: (3, 84, 84) floats in [0, 255] as learn2learn gives them), so a
``transform`` receives a tensor, not a PIL image; labels are ints; ``root`` is metagrad's data folder
(``<root>/omniglot/``, ``<root>/mini-imagenet/``), and data is decoded once into metagrad's cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.data.meta_dataset import ClassImages
from metagrad.data import miniimagenet, omniglot
from metagrad.data.datasets import resolve_cache_dir, resolve_data_dir
from metagrad.errors import ConfigError

__all__ = ["FullOmniglot", "MiniImagenet"]

Transform = Callable[[Any], Any] | None


class FullOmniglot(ClassImages):
    """All 1623 Omniglot characters (background then evaluation set), 20 drawings each: 32460 images.

    Label ``c`` is character ``c`` in torchvision's (and learn2learn's) order: alphabets sorted by name,
    then characters; ``dataset.class_names[c]`` names it.

    Args:
        root: metagrad's data folder holding ``omniglot/`` (or the Omniglot files themselves); ``~``
            is expanded. None: ``$METAGRAD_DATA`` or the default folder.
        transform: applied to each (1, 28, 28) float tensor.
        target_transform: applied to each label.
        download: fetch the official archives that are missing.

    Raises:
        DataError: the files are missing (the message says how to get them) or corrupt.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, transform: Transform = None,
                 target_transform: Transform = None, download: bool = False) -> None:
        data_dir = resolve_data_dir(root)
        folder = omniglot.download(data_dir) if download else omniglot.find_root(data_dir)
        images, self.class_names = omniglot.load_images(folder, resolve_cache_dir(None))
        super().__init__(images, transform, target_transform)


class MiniImagenet(ClassImages):
    """One split of Mini-ImageNet (Ravi & Larochelle): 64 / 16 / 20 classes of 600 images, 3x84x84.

    Images are float tensors in [0, 255], as learn2learn's ``MiniImagenet`` returns them (its benchmark
    divides by 255). Reads learn2learn's pickles (``mini-imagenet-cache-<mode>.pkl``) or the CSV + JPEG
    layout, from ``<root>/mini-imagenet/``.

    Args:
        root: metagrad's data folder holding ``mini-imagenet/``; ``~`` is expanded.
        mode: "train", "validation" or "test".
        transform: applied to each (3, 84, 84) float tensor.
        target_transform: applied to each label.
        download: must be False: Mini-ImageNet has no official download (the error says where the
            files come from).

    Raises:
        ConfigError: unknown ``mode``, or ``download=True``.
        DataError: the files are missing, malformed or incomplete.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, mode: str = "train",
                 transform: Transform = None, target_transform: Transform = None,
                 download: bool = False) -> None:
        if mode not in miniimagenet.PICKLE_NAMES:
            raise ConfigError(f"mode must be one of {', '.join(miniimagenet.PICKLE_NAMES)}, got {mode!r}")
        folder = miniimagenet.find_root(resolve_data_dir(root))
        if download:
            raise ConfigError(f"MiniImagenet cannot be downloaded automatically (download=True). "
                              f"{miniimagenet.sources_hint(folder)}")
        images, self.class_names = miniimagenet.load_split(folder, mode, resolve_cache_dir(None))
        super().__init__(images, transform, target_transform, pixel_max=255.0)


_OWN_IMAGES = ("its reader is not provided; lay the images out as a folder dataset "
               "(DATA/NAME/{train,validation,test}/CLASS/IMAGE), load a split with "
               "metagrad.data.load_dataset(\"folder\", split, "
               "data_dir=DATA, folder=NAME) and wrap it in l2l.data.MetaDataset")
_NOT_PROVIDED = {
    "TieredImagenet": _OWN_IMAGES,
    "CIFARFS": _OWN_IMAGES,
    "FC100": _OWN_IMAGES,
    "VGGFlower102": _OWN_IMAGES,
    "FGVCAircraft": _OWN_IMAGES,
    "CUBirds200": _OWN_IMAGES,
    "DescribableTextures": _OWN_IMAGES,
    "Quickdraw": _OWN_IMAGES,
    "FGVCFungi": _OWN_IMAGES,
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
