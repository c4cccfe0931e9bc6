"""Mini-ImageNet (Vinyals et al., 2016): 100 ImageNet classes x 600 RGB images at 84x84.

The split is Ravi and Larochelle's: 64 train, 16 validation, 20 test classes. There is no stable
official download, so metagrad never downloads it; put one of these two formats in
``<data_dir>/mini-imagenet/`` (or ``<data_dir>`` itself):

1. learn2learn's pickles ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-validation.pkl`` and
   ``mini-imagenet-cache-test.pkl``: each a dict with ``"image_data"``, an (N, 84, 84, 3) uint8 array,
   and ``"class_dict"``, ``{class_name: [row indices into image_data]}``. They are read with a restricted
   unpickler that rebuilds numpy arrays and plain containers only, so a tampered file cannot run
   code. Since they are already decoded, they are not cached again.
2. Ravi and Larochelle's split files ``train.csv``, ``val.csv`` and ``test.csv`` (header
   ``filename,label``; from github.com/twitter/meta-learning-lstm, ``data/miniImagenet/``) plus an
   ``images/`` folder holding those ImageNet JPEGs (from the ILSVRC-2012 training set). Each image is
   converted to RGB and resized to 84x84 with Lanczos once; the result is cached in the cache folder.

The pickles come from learn2learn's ``MiniImagenet`` download (Google Drive / Dropbox links that often
return an HTML page instead of the file: such a file is detected and reported).

Class order: class names (WordNet ids) sorted; images of a class in file (pickle or CSV) order.

References:
    Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016.
    Ravi and Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io
from metagrad.data._splits import Counts, cached_images, split_counts
from metagrad.errors import DataError

logger = logging.getLogger(__name__)

FOLDER = "mini-imagenet"
IMAGE_SIZE = 84  # pixels per side
PICKLE_NAMES = {split: f"mini-imagenet-cache-{split}.pkl" for split in ("train", "validation", "test")}
CSV_NAMES = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
IMAGES_FOLDER = "images"


OFFICIAL_COUNTS = Counts((("train", 64), ("validation", 16), ("test", 20)), images=600)

SOURCES_HINT = (
    "Mini-ImageNet has no stable official download. Put either learn2learn's "
    "mini-imagenet-cache-{train,validation,test}.pkl, or Ravi & Larochelle's train.csv/val.csv/test.csv "
    "(github.com/twitter/meta-learning-lstm, data/miniImagenet/) with an images/ folder of the "
    "ImageNet JPEGs they name, in {root}."
)


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/mini-imagenet``, or ``data_dir`` itself when it directly holds the files."""
    nested = data_dir / FOLDER
    if not _has_files(nested) and _has_files(data_dir):
        return data_dir
    return nested


def _has_files(root: Path) -> bool:
    names = [*PICKLE_NAMES.values(), *CSV_NAMES.values()]
    return any((root / name).is_file() for name in names)


def sources_hint(root: Path) -> str:
    """Where the files come from and where to put them."""
    return SOURCES_HINT.replace("{root}", str(root))


def source_of(root: Path, split: str) -> tuple[str, Path]:
    """Which format serves ``split``: ``("pickle", path)`` if its pickle exists, else ``("csv", path)``.

    Raises:
        DataError: neither file exists.
    """
    pickle_path, csv_path = root / PICKLE_NAMES[split], root / CSV_NAMES[split]
    if pickle_path.is_file():
        return "pickle", pickle_path
    if csv_path.is_file():
        return "csv", csv_path
    missing = " (the folder does not exist)" if not root.exists() else ""
    raise DataError(
        f"Mini-ImageNet split '{split}' not found: no {pickle_path.name} or {csv_path.name} in "
        f"{root}{missing}. "
        + sources_hint(root)
    )


def _check_counts(path: Path, split: str, class_sizes: dict[str, int], counts: Counts) -> None:
    expected = counts.classes_in(split)
    if len(class_sizes) != expected:
        raise DataError(
            f"{path} holds {len(class_sizes)} classes; Mini-ImageNet's '{split}' split has {expected}. "
            f"The file is incomplete or belongs to another split. {sources_hint(path.parent)}"
        )
    wrong = {name: n for name, n in class_sizes.items() if n != counts.images}
    if wrong:
        name, n = next(iter(wrong.items()))
        raise DataError(
            f"{path}: class {name} has {n} images, expected {counts.images}"
            + (f" ({len(wrong) - 1} more classes have the wrong count)" if len(wrong) > 1 else "")
            + f". The file is incomplete or corrupt. {sources_hint(path.parent)}"
        )


def _load_pickle(path: Path, split: str, counts: Counts) -> tuple[Tensor, list[str]]:
    data = _io.restricted_load(path)
    image_data = data.get("image_data") if isinstance(data, dict) else None
    class_dict = data.get("class_dict") if isinstance(data, dict) else None
    if not isinstance(image_data, np.ndarray) or not isinstance(class_dict, dict):
        raise DataError(
            f"{path} is not a Mini-ImageNet cache: expected a dict with 'image_data' (a numpy array) and "
            f"'class_dict', found {type(data).__name__}"
            + (f" with keys {sorted(map(str, data))}" if isinstance(data, dict) else "")
            + f". {sources_hint(path.parent)}"
        )
    if (image_data.dtype != np.uint8 or image_data.ndim != 4
            or image_data.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)):
        raise DataError(
            f"{path}: 'image_data' is {image_data.dtype} with shape {image_data.shape}; expected uint8 "
            f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3). {sources_hint(path.parent)}"
        )
    try:
        indices = {str(name): np.asarray(rows, dtype=np.int64).reshape(-1)
                   for name, rows in class_dict.items()}
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'class_dict' must map class names to lists of row indices "
                        f"({exc}).") from None
    _check_counts(path, split, {name: len(rows) for name, rows in indices.items()}, counts)
    names = sorted(indices)
    rows = np.stack([indices[name] for name in names])  # (classes, images)
    if rows.size and (rows.min() < 0 or rows.max() >= len(image_data)):
        raise DataError(
            f"{path}: 'class_dict' refers to image {int(rows.max())} but 'image_data' has only "
            f"{len(image_data)} images; the file is corrupt. {sources_hint(path.parent)}"
        )
    with warnings.catch_warnings():  # a protocol-5 pickle gives a read-only array; we only read it
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(image_data)  # (N, 84, 84, 3)
    images = torch.empty((len(names), rows.shape[1], 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for c, class_rows in enumerate(torch.from_numpy(rows)):  # one class at a time: no second full-size copy
        images[c] = pixels[class_rows].permute(0, 3, 1, 2)  # (images, 84, 84, 3) -> (images, 3, 84, 84)
    return images, names


def _read_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [filename, ...]}`` in file order, from a ``filename,label`` CSV."""
    if _io.looks_like_html(_io.read_head(path)):
        raise DataError(f"{path} is an HTML page, not a CSV: a failed download. {sources_hint(path.parent)}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a readable CSV ({exc}). {sources_hint(path.parent)}") from None
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(
            f"{path} does not start with the header 'filename,label' "
            f"(found {rows[0] if rows else 'an empty file'}). "
            f"{sources_hint(path.parent)}"
        )
    classes: dict[str, list[str]] = defaultdict(list)
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0] or not row[1]:
            raise DataError(f"{path}, line {line}: expected 'filename,label', found {','.join(row)!r}.")
        filename, label = row[0].strip(), row[1].strip()
        _io.check_member_name(filename, path)  # a filename must stay inside images/
        classes[label].append(filename)
    return classes


def _decode_jpeg(path: Path) -> np.ndarray:
    """An image file -> (84, 84, 3) uint8 RGB, Lanczos-resized."""
    try:
        return _io.decode_image(path, str(path), "RGB", IMAGE_SIZE, "Replace it.")  # checks the file too
    except FileNotFoundError:
        raise DataError(
            f"{path} is listed in the split CSV but missing from the images folder. "
            f"{sources_hint(path.parent.parent)}"
        ) from None


def _load_csv(path: Path, split: str, cache_dir: Path, counts: Counts) -> tuple[Tensor, list[str]]:
    classes = _read_csv(path)
    _check_counts(path, split, {name: len(files) for name, files in classes.items()}, counts)
    folder = path.parent / IMAGES_FOLDER
    if not folder.is_dir():
        raise DataError(f"{path} names images in {folder}, which does not exist. {sources_hint(path.parent)}")
    names = sorted(classes)
    files = [folder / f for name in names for f in classes[name]]
    stats = [(str(Path(IMAGES_FOLDER) / f), _stat(folder / f, path)) for name in names for f in classes[name]]
    key = _io.fingerprint([(path.name, path.stat()), *stats])
    cache = _io.cache_file(cache_dir, f"mini-imagenet-{split}", path.parent)
    images = cached_images(cache, key, (len(names), counts.images, 3, IMAGE_SIZE, IMAGE_SIZE), names)
    if images is not None:
        return images, names
    logger.info("decoding Mini-ImageNet '%s' from %s (once; cached in %s)", split, folder, cache)
    out = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    bar = tqdm(files, desc=f"Decoding Mini-ImageNet {split} (once)", unit="img",
               disable=not _io.show_progress())
    for i, file in enumerate(bar):
        out[i] = _decode_jpeg(file)
    # (classes*images, 84, 84, 3) -> (classes, images, 3, 84, 84)
    images = torch.from_numpy(out).reshape(len(names), counts.images, IMAGE_SIZE, IMAGE_SIZE, 3)
    images = images.permute(0, 1, 4, 2, 3).contiguous()
    _io.save_cache(cache, key, images=images, class_names=names)
    return images, names


def _stat(file: Path, csv_path: Path) -> os.stat_result:
    try:
        return file.stat()
    except FileNotFoundError:
        raise DataError(
            f"{file} is listed in {csv_path.name} but missing. {sources_hint(csv_path.parent)}"
        ) from None


def load_split(
    root: Path, split: str, cache_dir: Path, *, split_scheme: str = "ravi", counts: Counts | None = None,
) -> tuple[Tensor, list[str]]:
    """One split as ``(images (classes, 600, 3, 84, 84) uint8, class_names)`` from either format.

    ``split_scheme`` is always ``"ravi"`` (Ravi & Larochelle's 64/16/20): the files themselves are split.

    Raises:
        DataError: missing, malformed, unsafe or incomplete files.
    """
    counts = counts or OFFICIAL_COUNTS  # read at call time, so tests can patch it
    kind, path = source_of(root, split)
    if kind == "pickle":
        return _load_pickle(path, split, counts)
    return _load_csv(path, split, cache_dir, counts)


def info(root: Path, cache_dir: Path, *, split_scheme: str = "ravi") -> dict:
    """Facts about the data under ``root``; loads each split (building the cache for the CSV format)."""
    splits, sources = {}, {}
    for split in PICKLE_NAMES:
        images, _ = load_split(root, split, cache_dir)
        splits[split] = split_counts([images.shape[1]] * images.shape[0])
        sources[split] = str(source_of(root, split)[1])
    return {
        "dataset": "mini-imagenet",
        "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE],
        "splits": splits,
        "root": str(root),
        "split_scheme": split_scheme,
        "sources": sources,
    }
