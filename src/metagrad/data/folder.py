"""A user's own few-shot dataset: one folder of images per class.

Input: ``<data_dir>/<folder>/{train,validation,test}/<class>/<image>``, where ``<folder>`` is the
dataset's name (config ``data.folder``), each split folder holds one subfolder per class (its name is the
class name) and each class folder holds images in any format Pillow reads. Hidden files (``.DS_Store``,
``._*``) are skipped; every other file must be an image.

Decoding happens once per split, into one uint8 tensor (classes, images_per_class, C, H, W) cached in
the cache folder and rebuilt when a file changes (as Omniglot and Mini-ImageNet). Images are converted to
the inputs of metagrad's standard networks: when no image of the dataset shows colour, to 1x28x28
grayscale as Omniglot (its networks: ``omniglot-cnn``, ``omniglot-fc``); when any does, to 3x84x84 RGB
as Mini-ImageNet (``mini-imagenet-cnn``), its grayscale images copied into each channel, with a warning
naming a colour image when they are fewer than the grayscale ones. An image shows colour when its pixels
are not all R = G = B, whatever its file's mode (a grayscale picture saved as RGB is grayscale).
Resizing is Lanczos, to a square (the aspect ratio is not kept, as Omniglot's and Mini-ImageNet's
preparations do). Values are mapped to 0..255 as :func:`metagrad.data._io.to_mode` says: 16-bit and
float images scaled from their full range (floats must lie in [0, 1]), alpha composited over white;
an image whose values have no such meaning is refused, naming it. No inversion.

Class names are the folder names; a name that is not valid UTF-8 keeps its other bytes as ``\\xNN``
escapes (``caf\\xe9``), so it can be shown, logged and saved.

Classes are sorted by folder name and images within a class by file name. Classes may hold different
numbers of images: each keeps all of its own (tasks draw uniformly within each class), and the split is
then a flat tensor with its class sizes (see :class:`~metagrad.data.FewShotDataset`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io
from metagrad.data._splits import split_counts
from metagrad.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["GRAY_SIZE", "RGB_SIZE", "SPLIT_FOLDERS", "check_folder_name", "find_root", "info", "load_split"]

SPLIT_FOLDERS = ("train", "validation", "test")  # split name = folder name
GRAY_SIZE = 28  # side of grayscale datasets (Omniglot's networks)
RGB_SIZE = 84  # side of color datasets (Mini-ImageNet's networks)
DECODING_VERSION = 2  # part of the cache key: a cache decoded by another version of the rules is rebuilt
MIN_CLASSES = 2  # fewer cannot make a classification task
MIN_IMAGES = 2  # per class: at least one support and one query image
LAYOUT = "<data_dir>/<folder>/{train,validation,test}/<class>/<image>"


def check_folder_name(folder: object) -> str:
    """``folder`` if it names one folder (no path separator); else ConfigError saying what to set."""
    if not isinstance(folder, str) or not folder or folder in (".", "..") or "/" in folder or "\\" in folder:
        raise ConfigError(f"data.folder must be the name of one folder under the data folder ({LAYOUT}), "
                          f"got {folder!r}")
    return folder


def find_root(data_dir: Path, folder: str) -> Path:
    """``<data_dir>/<folder>``, checked to hold the three split folders.

    Raises:
        DataError: the folder or one of its split folders is missing (the message shows the layout).
    """
    root = data_dir / check_folder_name(folder)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist. Put your images there as {LAYOUT}, or set "
                        f"data.data_dir / data.folder to where they are.")
    missing = [name for name in SPLIT_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise DataError(f"{root} has no {', '.join(missing)} folder; the layout is {LAYOUT}")
    return root


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def class_name(folder_name: str) -> str:
    """A folder's name as a class name: as it is when valid UTF-8, else with the other bytes escaped."""
    return os.fsencode(folder_name).decode("utf-8", "backslashreplace")


def _listing(root: Path, split: str) -> dict[str, list[Path]]:
    """class name -> its image files, sorted, for one split; checks the counts."""
    folder = root / split
    classes: dict[str, list[Path]] = {}
    for d in sorted(folder.iterdir()):
        if d.is_dir() and not _hidden(d):
            name = class_name(d.name)
            if name in classes:  # "caf\xe9" spelled out beside a folder whose name has the byte 0xe9
                raise DataError(f"{folder} has two class folders named {name!r} once shown as text; "
                                "rename one")
            # not only regular files: a pipe or device among the images is refused, not skipped
            classes[name] = sorted(f for f in d.iterdir() if not f.is_dir() and not _hidden(f))
            broken = next((f for f in classes[name] if not f.exists()), None)
            if broken is not None:
                raise DataError(f"{broken} is a symbolic link to nothing ({os.readlink(broken)}); remove it "
                                "or restore the file it points to")
    if len(classes) < MIN_CLASSES:
        raise DataError(f"{folder} has {len(classes)} class folder(s); a few-shot split needs at least "
                        f"{MIN_CLASSES} (one subfolder per class: {LAYOUT})")
    small = {name: len(files) for name, files in classes.items() if len(files) < MIN_IMAGES}
    if small:
        name, count = next(iter(small.items()))
        others = f" ({len(small)} classes have too few)" if len(small) > 1 else ""
        raise DataError(f"class folder {folder / name} has {count} image(s); each class needs at least "
                        f"{MIN_IMAGES} (support and query){others}")
    return classes


_REPLACE = "Remove or replace it."


def _grayscale(root: Path) -> bool:
    """Whether no image of any split shows colour (then the dataset is 1x28x28; else 3x84x84).

    Reads every file's header first (so an unreadable or oversized file in any split is reported by the
    first split loaded, before anything is decoded), then the pixels of colour-mode files until one
    shows colour.
    """
    files = [f for split in SPLIT_FOLDERS for files in _listing(root, split).values() for f in files]
    modes = {}
    for f in files:
        with _io.open_image(f, str(f), _REPLACE) as image:  # the header only
            modes[f] = image.mode
    colour_modes = [f for f in files if modes[f] not in _io.GRAY_MODES]
    colour = next((f for f in colour_modes if _shows_colour(f)), None)
    if colour is None:
        return True
    if 2 * len(colour_modes) < len(files):
        logger.warning("%s: %d of its %d images are in colour modes (%s shows colour), the others grayscale: "
                       "the dataset is decoded as %dx%d RGB, grayscale images in every channel. Convert the "
                       "colour ones to grayscale for a 1x%dx%d dataset", root, len(colour_modes), len(files),
                       colour, RGB_SIZE, RGB_SIZE, GRAY_SIZE, GRAY_SIZE)
    return False


def _shows_colour(path: Path) -> bool:
    with _io.open_image(path, str(path), _REPLACE) as image:
        return _io.is_colour(image)


def _decode(path: Path, gray: bool) -> np.ndarray:
    side = GRAY_SIZE if gray else RGB_SIZE
    pixels = _io.decode_image(path, str(path), "L" if gray else "RGB", side, _REPLACE)
    return pixels.reshape(side, side, -1)  # (side, side, C)


def load_split(root: Path, split: str, cache_dir: Path, *, split_scheme: str = "folders"
               ) -> tuple[Tensor, list[str], tuple[int, ...] | None]:
    """One split as ``(images, class_names, class_sizes)``: images (classes, images_per_class, C, side,
    side) uint8 and ``class_sizes`` None when every class has as many images, else images (total, C, side,
    side) with each class's count in ``class_sizes``; side is 28 (grayscale) or 84 (RGB).

    Raises:
        DataError: a split with fewer than 2 classes, a class with fewer than 2 images, or an image that
            cannot be read or mapped to pixel values faithfully (the message names the file).
    """
    classes = _listing(root, split)
    names = sorted(classes)
    sizes = tuple(len(classes[name]) for name in names)
    files = [f for name in names for f in classes[name]]
    all_files = sorted(f for s in SPLIT_FOLDERS for fs in _listing(root, s).values() for f in fs)
    # the key covers every split's files: one of them decides whether the dataset is grayscale
    key = _io.fingerprint([(str(f.relative_to(root)), f.stat()) for f in all_files], version=DECODING_VERSION)
    cache = _io.cache_file(cache_dir, f"folder-{root.name}-{split}", root)
    cached = _io.load_cache(cache, key)
    equal = len(set(sizes)) == 1
    if cached is not None:
        images = cached.get("images")
        shape = (len(names), sizes[0]) if equal else (sum(sizes),)  # (classes, per_class) or (total,)
        if isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == len(shape) + 3 \
                and tuple(images.shape[:len(shape)]) == shape and cached.get("class_names") == names:
            return images, names, None if equal else sizes
        logger.warning("cache %s holds unexpected contents; rebuilding it", cache)
    gray = _grayscale(root)
    logger.info("decoding %s '%s' from %s (once; cached in %s)", root.name, split, root / split, cache)
    bar = tqdm(files, desc=f"Decoding {root.name} {split} (once)", unit="img",
               disable=not _io.show_progress())
    pixels = np.stack([_decode(f, gray) for f in bar])  # (total, side, side, C)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (total, side, side, C) -> (total, C, side, side)
    if equal:  # (classes*per_class, C, side, side) -> (classes, per_class, C, side, side)
        images = images.reshape(len(names), sizes[0], *images.shape[1:])
    images = images.contiguous()
    _io.save_cache(cache, key, images=images, class_names=names)
    return images, names, None if equal else sizes


def info(root: Path, cache_dir: Path, *, split_scheme: str = "folders") -> dict:
    """Facts about the dataset under ``root``; loads (and caches) each split."""
    splits, shape = {}, None
    for split in SPLIT_FOLDERS:
        images, names, sizes = load_split(root, split, cache_dir)
        splits[split] = split_counts(sizes or (images.shape[1],) * len(names))
        shape = list(images.shape[-3:])
    return {"dataset": "folder", "folder": root.name, "image_shape": shape, "splits": splits,
            "root": str(root), "split_scheme": split_scheme}
