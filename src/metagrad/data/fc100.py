"""FC100 (Oreshkin et al., 2018): CIFAR-100 split by superclass, 100 classes x 600 RGB images at 32x32.

The split is by superclass, so that train and test classes share as little as possible: 12 superclasses
(60 classes) train, 4 (20) validation, 4 (20) test. There is no official download with a published
checksum, so metagrad never downloads it. Put the pickles of MetaOptNet's release (Lee et al. 2019,
which learn2learn downloads), ``FC100_train.pickle``, ``FC100_val.pickle`` and ``FC100_test.pickle``, or
the ``fc100.zip`` that holds them, in ``<data_dir>/fc100/``; learn2learn's place, the pickles directly in
``<data_dir>``, is read too. Each pickle is a dict with ``"data"``, an (N, 32, 32, 3) uint8 array, and
``"labels"``, N CIFAR-100 fine-label ids. They are read with a restricted unpickler (numpy arrays and
plain containers only, Python 2 pickles included), so a tampered file cannot run code. They are already
decoded, so nothing is cached.

Class order: label ids ascending; class names are the CIFAR-100 fine-label ids (``"0"`` to ``"99"``);
images of a class in file order.

References:
    Oreshkin, Rodriguez and Lacoste, "TADAM: Task dependent adaptive metric for improved few-shot
    learning", NeurIPS 2018.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagrad.data import _io
from metagrad.data._splits import Counts, split_counts
from metagrad.errors import DataError

FOLDER = "fc100"
ARCHIVE = "fc100.zip"
IMAGE_SIZE = 32
PICKLE_NAMES = {"train": "FC100_train.pickle", "validation": "FC100_val.pickle", "test": "FC100_test.pickle"}
MAX_PICKLE_BYTES = 1 << 30  # a complete train pickle is 111 MB; a zip member declaring more is refused

SOURCES_HINT = (
    "FC100 has no official download with a checksum. Get FC100_train.pickle, FC100_val.pickle and "
    "FC100_test.pickle (MetaOptNet's release, github.com/kjunelee/MetaOptNet; learn2learn's fc100.zip on "
    "zenodo.org/record/7978538 holds them) and put them, or fc100.zip, in {root}."
)


OFFICIAL_COUNTS = Counts((("train", 60), ("validation", 20), ("test", 20)), images=600)


def sources_hint(root: Path) -> str:
    return SOURCES_HINT.format(root=root)


def _has_files(folder: Path) -> bool:
    return (folder / ARCHIVE).is_file() or any((folder / name).is_file() for name in PICKLE_NAMES.values())


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/fc100``, or ``data_dir`` itself when it holds the pickles (learn2learn's place)."""
    nested = data_dir / FOLDER
    if not _has_files(nested) and _has_files(data_dir):
        return data_dir
    return nested


def _read(root: Path, split: str) -> tuple[Any, str]:
    """The unpickled content of ``split``'s pickle, from the folder or the zip, and how to name it."""
    path = root / PICKLE_NAMES[split]
    if path.is_file():
        return _io.restricted_load(path), str(path)
    archive = root / ARCHIVE
    if not archive.is_file():
        missing = " (the folder does not exist)" if not root.exists() else ""
        raise DataError(f"FC100 split '{split}' not found: no {path.name} or {ARCHIVE} in {root}{missing}. "
                        + sources_hint(root))
    try:
        with zipfile.ZipFile(archive) as zf:
            entries = [n for n in zf.namelist() if _io.check_member_name(n, archive)[-1:] == [path.name]]
            if not entries:
                raise DataError(f"{archive} holds no {path.name}. {sources_hint(root)}")
            entry = entries[0]
            size = zf.getinfo(entry).file_size
            if size > MAX_PICKLE_BYTES:
                raise DataError(f"{archive}: {entry} declares {size:,} bytes, more than FC100's pickles "
                                f"({MAX_PICKLE_BYTES:,}): a damaged or hostile archive; refusing to read it.")
            with zf.open(entry) as member:
                payload = member.read(MAX_PICKLE_BYTES + 1)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive} is not a readable zip ({exc}); delete it and get it again. "
                        f"{sources_hint(root)}") from None
    name = f"{archive}: {entry}"
    return _io.restricted_loads(payload, name), name


def load_split(root: Path, split: str, cache_dir: Path, *, split_scheme: str = "oreshkin",
               counts: Counts | None = None) -> tuple[Tensor, list[str]]:
    """One split as ``(images (classes, 600, 3, 32, 32) uint8, class_names)``.

    Raises:
        DataError: missing, malformed, unsafe or incomplete files (the message names the file).
    """
    counts = counts or OFFICIAL_COUNTS  # read at call time, so tests can patch it
    data, name = _read(root, split)
    pixels = data.get("data") if isinstance(data, dict) else None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(pixels, np.ndarray) or labels is None:
        raise DataError(f"{name} is not an FC100 pickle: expected a dict with 'data' (a numpy array) and "
                        f"'labels', found {type(data).__name__}"
                        + (f" with keys {sorted(map(str, data))}" if isinstance(data, dict) else "")
                        + f". {sources_hint(root)}")
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"{name}: 'data' is {pixels.dtype} with shape {pixels.shape}; expected uint8 "
                        f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3). {sources_hint(root)}")
    try:
        ids = np.asarray(labels).astype(np.int64, casting="safe").reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name}: 'labels' must be integers ({exc}). {sources_hint(root)}") from None
    if len(ids) != len(pixels):
        raise DataError(f"{name}: {len(ids)} labels for {len(pixels)} images; the file is corrupt. "
                        f"{sources_hint(root)}")
    classes, sizes = np.unique(ids, return_counts=True)
    if len(classes) != counts.classes_in(split) or (sizes != counts.images).any():
        raise DataError(f"{name} holds {len(classes)} classes of {sizes.min() if len(sizes) else 0} to "
                        f"{sizes.max() if len(sizes) else 0} images; FC100's '{split}' split has "
                        f"{counts.classes_in(split)} of {counts.images}. The file is incomplete or belongs "
                        f"to another split. {sources_hint(root)}")
    order = np.argsort(ids, kind="stable")  # class after class, file order within a class
    with warnings.catch_warnings():  # an array unpickled from bytes is read-only; we only read it
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(pixels)[torch.from_numpy(order)]  # (N, 32, 32, 3)
    # (classes*images, 32, 32, 3) -> (classes, images, 3, 32, 32)
    images = flat.view(len(classes), counts.images, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 1, 4, 2, 3)
    return images.contiguous(), [str(c) for c in classes]


def info(root: Path, cache_dir: Path, *, split_scheme: str = "oreshkin") -> dict:
    """Facts about the data under ``root``; reads each split."""
    splits = {}
    for split in PICKLE_NAMES:
        images, names = load_split(root, split, cache_dir)
        splits[split] = split_counts([images.shape[1]] * len(names))
    return {"dataset": "fc100", "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE], "splits": splits,
            "root": str(root), "split_scheme": split_scheme}
