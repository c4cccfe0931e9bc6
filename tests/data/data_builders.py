"""Builders for small data sets in the real on-disk formats (official Omniglot zips and folders,
learn2learn's Mini-ImageNet pickles, Ravi & Larochelle's CSVs with a JPEG folder), and the real-data
locator."""

from __future__ import annotations

import csv
import importlib.util
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metagrad.data import miniimagenet, omniglot


def _real_data_dir() -> Path | None:
    """``real_data_dir()`` of tests/conftest.py. Every conftest module is named ``conftest``, so a plain
    import could pick the wrong one: load that file by path instead."""
    spec = importlib.util.spec_from_file_location("_metagrad_root_conftest",
                                                  Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.real_data_dir()


REAL_DATA_DIR = _real_data_dir()
"""The folder holding the real ``omniglot/`` (``$METAGRAD_DATA`` or ../shared/data), or None."""

# A small Omniglot: alphabets -> number of characters, in each image set (5 alphabets, 10 characters).
SMALL_OMNIGLOT = {
    "images_background": {"Latin": 3, "Greek": 2, "Braille": 1},
    "images_evaluation": {"Tengwar": 2, "Angelic": 2},
}
SMALL_COUNTS = omniglot.Counts(alphabets=5, characters=10, drawings=20)
SMALL_MAML_SPLITS = {"train": (0, 6), "validation": (6, 8), "test": (8, 10)}
DRAWING_SIZE = 105  # the official drawings are 105 x 105, 1-bit


def drawing_png(character: int, drawing: int, size: int = DRAWING_SIZE) -> bytes:
    """A 1-bit PNG like Omniglot's: black strokes on white, different for every (character, drawing)."""
    rng = np.random.default_rng(1000 * character + drawing)
    ink = np.zeros((size, size), dtype=bool)
    for _ in range(4):  # a few thick random strokes
        r, c = rng.integers(10, size - 10, 2)
        h, w = rng.integers(3, 40, 2)
        ink[r:r + h, c:c + 5] = True
        ink[r:r + 5, c:c + w] = True
    buffer = io.BytesIO()
    Image.fromarray(~ink).convert("1").save(buffer, format="PNG")  # True = white background
    return buffer.getvalue()


def omniglot_entries(layout: dict[str, dict[str, int]] | None = None, drawings: int = 20):
    """Yield ``(image_set, "images_x/Alphabet/characterNN/id_NN.png", png bytes)`` in class order."""
    layout = layout or SMALL_OMNIGLOT
    character = 0
    for image_set in omniglot.IMAGE_SET_NAMES:
        for alphabet in sorted(layout[image_set]):
            for c in range(1, layout[image_set][alphabet] + 1):
                character += 1
                for d in range(1, drawings + 1):
                    name = f"{image_set}/{alphabet}/character{c:02d}/{character:04d}_{d:02d}.png"
                    yield image_set, name, drawing_png(character, d)


def write_omniglot_zips(
    root: Path, layout: dict[str, dict[str, int]] | None = None, *, drawings: int = 20,
    extra: dict[str, dict[str, bytes]] | None = None, skip: set[str] = frozenset(),
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """Write images_background.zip and images_evaluation.zip in the official layout under ``root``.

    Args:
        extra: image set -> {entry name: bytes} added to that zip (for hostile or odd entries).
        skip: entry names left out.
        compression: ``zipfile.ZIP_STORED`` (as the official archives' PNGs) or ``ZIP_DEFLATED``.
    """
    root.mkdir(parents=True, exist_ok=True)
    archives = {name: zipfile.ZipFile(root / f"{name}.zip", "w", compression)
                for name in omniglot.IMAGE_SET_NAMES}
    for image_set, name, data in omniglot_entries(layout, drawings):
        if name not in skip:
            archives[image_set].writestr(name, data)
    for image_set, entries in (extra or {}).items():
        for name, data in entries.items():
            archives[image_set].writestr(name, data)
    for archive in archives.values():
        archive.close()
    return root


def write_omniglot_folders(root: Path, layout: dict[str, dict[str, int]] | None = None) -> Path:
    """The same data as :func:`write_omniglot_zips`, already extracted."""
    for _, name, data in omniglot_entries(layout):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


# ------------------------------------------------------------------------------------------------
# Mini-ImageNet

MINI_SIZE = miniimagenet.IMAGE_SIZE
SMALL_MINI_COUNTS = miniimagenet.Counts(classes=(("train", 4), ("validation", 2), ("test", 3)), images=6)


def mini_classes(split: str, counts: miniimagenet.Counts = SMALL_MINI_COUNTS) -> list[str]:
    """WordNet-like ids, deliberately not in sorted order."""
    offset = {"train": 100, "validation": 200, "test": 300}[split]
    return [f"n{offset + i:08d}" for i in reversed(range(counts.classes_in(split)))]


def mini_image(label: int, index: int) -> np.ndarray:
    """(84, 84, 3) uint8 whose first pixels identify (label, index)."""
    rng = np.random.default_rng(label * 1000 + index)
    image = rng.integers(0, 256, (MINI_SIZE, MINI_SIZE, 3), dtype=np.uint8)
    image[0, 0] = (label % 256, index % 256, 7)
    return image


def mini_pickle_payload(split: str, counts: miniimagenet.Counts = SMALL_MINI_COUNTS) -> dict:
    """learn2learn's layout: images of all classes interleaved in ``image_data``, indices in
    ``class_dict``."""
    classes = mini_classes(split, counts)
    rows, class_dict = [], {}
    for i in range(counts.images):  # interleave: class order in image_data differs from sorted names
        for label, name in enumerate(classes):
            class_dict.setdefault(name, []).append(len(rows))
            rows.append(mini_image(label, i))
    return {"image_data": np.stack(rows), "class_dict": class_dict}


def write_mini_pickle(root: Path, split: str, payload: object = None, *, protocol: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / miniimagenet.PICKLE_NAMES[split]
    with open(path, "wb") as f:
        pickle.dump(mini_pickle_payload(split) if payload is None else payload, f, protocol=protocol)
    return path


def write_mini_csv(root: Path, split: str, counts: miniimagenet.Counts = SMALL_MINI_COUNTS) -> Path:
    """``<root>/<split>.csv`` plus JPEGs of assorted sizes in ``<root>/images/``."""
    images = root / miniimagenet.IMAGES_FOLDER
    images.mkdir(parents=True, exist_ok=True)
    path = root / miniimagenet.CSV_NAMES[split]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for label, name in enumerate(mini_classes(split, counts)):
            for i in range(counts.images):
                filename = f"{name}{i:08d}.jpg"
                size = (100 + 7 * i, 90 + 3 * label)  # ImageNet photos come in all sizes
                pixels = np.random.default_rng(label * 100 + i).integers(0, 256, (size[1], size[0], 3),
                                                                         np.uint8)
                Image.fromarray(pixels).save(images / filename, quality=90)
                writer.writerow([filename, name])
    return path
