"""``l2l.vision.datasets`` over metagrad's decoded, cached image tensors: ``FullOmniglot``,
``MiniImagenet``, ``CIFARFS``, ``FC100``, ``TieredImagenet`` and ``CUBirds200``.

Each is a :class:`~metagrad.compat.learn2learn.data.ClassImages`: ``dataset[i] -> (image tensor, label)``,
so a ``Taskset`` over them draws tasks by tensor indexing. Differences from learn2learn: images are
already tensors (Omniglot: (1, 28, 28) in [0, 1], ink = 1, resized with Lanczos as learn2learn's
benchmark does; Mini-ImageNet: (3, 84, 84) floats in [0, 255] as learn2learn gives them; CIFAR-FS and
FC100: (3, 32, 32) in [0, 1], what learn2learn's ``ToTensor`` gives; tiered-ImageNet: (3, 84, 84) in
[0, 1]; CUB: (3, 84, 84) in [0, 1], resized, where learn2learn gives the photographs at their own size),
so a ``transform`` receives a tensor, not a PIL image; labels are ints, classes numbered in metagrad's
order (sorted names or ids); ``root`` is metagrad's data folder, where learn2learn's own layout is read
too (``cifarfs/``, FC100's pickles in the folder itself, ``tiered-imagenet/``, ``cubirds200/``); data is
decoded once into metagrad's cache (tiered-ImageNet's memory-mapped).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from metagrad.compat.learn2learn._missing import missing_names
from metagrad.compat.learn2learn.data.meta_dataset import ClassImages
from metagrad.data import cub, miniimagenet, omniglot
from metagrad.data.datasets import DATASETS, load_dataset, resolve_cache_dir, resolve_data_dir
from metagrad.errors import ConfigError

__all__ = ["CIFARFS", "FC100", "CUBirds200", "FullOmniglot", "MiniImagenet", "TieredImagenet"]

MODES = ("train", "validation", "test")

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


class _Split(ClassImages):
    """One split of a registered dataset, loaded by metagrad's reader; ``mode`` as learn2learn names it."""

    dataset = ""  # the name in metagrad.data.DATASETS

    def __init__(self, root: str | os.PathLike[str] | None = None, mode: str = "train",
                 transform: Transform = None, target_transform: Transform = None, download: bool = False,
                 **options: object) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        data_dir = resolve_data_dir(root)
        spec = DATASETS[self.dataset]
        if download and spec.download is None:
            hint = spec.sources_hint(spec.find_root(data_dir)) if spec.sources_hint else ""
            raise ConfigError(f"{type(self).__name__} cannot be downloaded automatically (download=True). "
                              f"{hint}")
        split = load_dataset(self.dataset, mode, data_dir=data_dir, download=download, **options)
        self.class_names = split.class_names
        super().__init__(split.images, transform, target_transform, class_sizes=split.class_sizes)


class CIFARFS(_Split):
    """One split of CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 classes of 600 images, 3x32x32.

    Reads learn2learn's ``cifar100.zip`` or its extracted ``cifar100/`` folder, in ``<root>/cifar-fs/``
    or learn2learn's ``<root>/cifarfs/``.

    Args:
        root: metagrad's data folder; ``~`` is expanded. None: ``$METAGRAD_DATA`` or the default folder.
        mode: "train", "validation" or "test".
        transform: applied to each (3, 32, 32) float tensor in [0, 1].
        target_transform: applied to each label.
        download: must be False: there is no official download (the error says where the files are).

    Raises:
        ConfigError: unknown ``mode``, or ``download=True``.
        DataError: the files are missing, malformed or incomplete.
    """

    dataset = "cifar-fs"


class FC100(_Split):
    """One split of FC100 (Oreshkin et al. 2018): 60 / 20 / 20 CIFAR-100 classes by superclass, 600 images
    each, 3x32x32.

    Reads ``FC100_{train,val,test}.pickle`` (or ``fc100.zip``) in ``<root>/fc100/`` or, as learn2learn
    keeps them, in ``<root>`` itself. Arguments, errors: as :class:`CIFARFS`. Labels number the classes in
    ascending CIFAR-100 fine-label order (``class_names`` holds the ids).
    """

    dataset = "fc100"


class TieredImagenet(_Split):
    """One split of tiered-ImageNet (Ren et al. 2018): 351 / 97 / 160 classes of 732 to 1300 images,
    3x84x84 in [0, 1].

    Reads Ren et al.'s ``{train,val,test}_images_png.pkl`` and ``..._labels.pkl`` in
    ``<root>/tiered-imagenet/`` (learn2learn's place), decoded once into a memory-mapped cache: the split
    is never held in memory. Arguments, errors: as :class:`CIFARFS`.
    """

    dataset = "tiered-imagenet"


class CUBirds200(ClassImages):
    """CUB-200-2011 with Meta-Dataset's split, as learn2learn's ``CUBirds200``: 140 / 30 / 30 species, or all
    200 (``mode="all"``, the default), 41 to 60 photographs each, 3x84x84 in [0, 1].

    Reads the official ``CUB_200_2011.tgz`` or its ``CUB_200_2011/`` folder in ``<root>/cub/`` or
    learn2learn's ``<root>/cubirds200/``. Differences from learn2learn: the photographs are resized to
    84x84 (learn2learn gives them at their own size) and classes are numbered by species number, not in
    learn2learn's list order (``class_names`` names them).

    Args:
        root: metagrad's data folder; ``~`` is expanded.
        mode: "all", "train", "validation" or "test".
        transform: applied to each (3, 84, 84) float tensor.
        target_transform: applied to each label.
        download: fetch the official archive (checked against its MD5) when it is missing.
        include_imagenet_duplicates: keep the 43 photographs that are also in ILSVRC-2012's training set.
        bounding_box_crop: must be False: metagrad decodes whole photographs.

    Raises:
        ConfigError: unknown ``mode``, or ``bounding_box_crop=True``.
        DataError: the files are missing, corrupt or incomplete.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, mode: str = "all",
                 transform: Transform = None, target_transform: Transform = None, download: bool = False,
                 include_imagenet_duplicates: bool = False, bounding_box_crop: bool = False) -> None:
        if mode not in ("all", *MODES):
            raise ConfigError(f"mode must be one of all, {', '.join(MODES)}, got {mode!r}")
        if bounding_box_crop:
            raise ConfigError("bounding_box_crop=True is not provided: metagrad decodes whole photographs; "
                              "leave it False")
        data_dir = resolve_data_dir(root)
        folder = cub.download(data_dir) if download else cub.find_root(data_dir)
        images, self.class_names, sizes = cub.load_classes(
            folder, resolve_cache_dir(None), cub.class_ids(mode, "triantafillou"),
            exclude_duplicates=not include_imagenet_duplicates)
        super().__init__(images, transform, target_transform, class_sizes=sizes)


_OWN_IMAGES = ("its reader is not provided; lay the images out as a folder dataset "
               "(DATA/NAME/{train,validation,test}/CLASS/IMAGE), load a split with "
               "metagrad.data.load_dataset(\"folder\", split, "
               "data_dir=DATA, folder=NAME) and wrap it in l2l.data.MetaDataset")
_NOT_PROVIDED = {
    "VGGFlower102": _OWN_IMAGES,
    "FGVCAircraft": _OWN_IMAGES,
    "DescribableTextures": _OWN_IMAGES,
    "Quickdraw": _OWN_IMAGES,
    "FGVCFungi": _OWN_IMAGES,
}
__getattr__ = missing_names(__name__, _NOT_PROVIDED)
