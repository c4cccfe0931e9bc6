"""Builders for small data sets in the real on-disk formats (official Omniglot zips and folders,
learn2learn's Mini-ImageNet pickles, Ravi & Larochelle's CSVs with a JPEG folder), and the real-data
locator."""

from __future__ import annotations

import csv
import importlib.util
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from metagrad.data import cifarfs, cub, fc100, miniimagenet, omniglot, tieredimagenet


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


# ---------------------------------------------------------------------------------------------------------
# CIFAR-FS, FC100, tiered-ImageNet and CUB in their distributed formats, small.

SMALL_CIFARFS_COUNTS = cifarfs.Counts(classes=(("train", 4), ("validation", 2), ("test", 3)), images=5)
SMALL_FC100_COUNTS = fc100.Counts(classes=(("train", 4), ("validation", 2), ("test", 2)), images=6)
SMALL_TIERED_COUNTS = tieredimagenet.Counts(classes=(("train", 3), ("validation", 2), ("test", 2)))
TIERED_SIZES = {"train": (5, 9, 7), "validation": (4, 6), "test": (8, 5)}  # images per class, ragged
SMALL_CUB_COUNTS = cub.Counts(classes=8, images=8 * 4 + 2)  # 4 photographs per species, 2 more in two


def tagged_image(label: int, index: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 whose first pixel identifies (label, index)."""
    image = np.random.default_rng(label * 1000 + index).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image[0, 0] = (label % 256, index % 256, 7)
    return image


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def cifarfs_classes(split: str, counts: cifarfs.Counts = SMALL_CIFARFS_COUNTS) -> list[str]:
    offset = {"train": 0, "validation": 40, "test": 70}[split]
    return [f"class_{offset + i:02d}" for i in reversed(range(counts.classes_in(split)))]


def cifarfs_files(counts: cifarfs.Counts = SMALL_CIFARFS_COUNTS) -> dict[str, bytes]:
    """Paths inside ``cifar100/`` -> content: ``data/<class>/<n>.png`` and the Bertinetto class lists."""
    files: dict[str, bytes] = {}
    label = 0
    for split, list_name in cifarfs.SPLIT_FILES.items():
        classes = cifarfs_classes(split, counts)
        files[f"splits/bertinetto/{list_name}"] = ("\n".join(classes) + "\n").encode()
        for name in sorted(classes):
            for i in range(counts.images):
                files[f"data/{name}/{name}_{i:03d}.png"] = png_bytes(tagged_image(label, i, 32))
            label += 1
    return files


def write_cifarfs(root: Path, *, as_zip: bool, files: dict[str, bytes] | None = None) -> Path:
    """learn2learn's ``cifar100.zip`` in ``root``, or the ``cifar100/`` folder it extracts to."""
    root.mkdir(parents=True, exist_ok=True)
    files = cifarfs_files() if files is None else files
    if as_zip:
        with zipfile.ZipFile(root / cifarfs.ARCHIVE, "w") as zf:
            for name, data in files.items():
                zf.writestr(f"cifar100/{name}", data)
    else:
        for name, data in files.items():
            path = root / "cifar100" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def fc100_payload(split: str, counts: fc100.Counts = SMALL_FC100_COUNTS, *, py2: bool = False) -> dict:
    """MetaOptNet's layout: ``data`` (N, 32, 32, 3) uint8 with classes interleaved, ``labels`` a list of
    CIFAR-100 fine-label ids."""
    ids = {"train": [3, 17, 40, 88], "validation": [5, 61], "test": [9, 72]}[split][:counts.classes_in(split)]
    rows, labels = [], []
    for i in range(counts.images):
        for label in ids:
            rows.append(tagged_image(label, i, 32))
            labels.append(label)
    return {"data": np.stack(rows), "labels": labels}


def write_fc100(root: Path, *, as_zip: bool = False, protocol: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    blobs = {name: pickle.dumps(fc100_payload(split), protocol=protocol)
             for split, name in fc100.PICKLE_NAMES.items()}
    if as_zip:
        with zipfile.ZipFile(root / fc100.ARCHIVE, "w") as zf:
            for name, data in blobs.items():
                zf.writestr(f"FC100/{name}", data)
    else:
        for name, data in blobs.items():
            (root / name).write_bytes(data)
    return root


def tiered_payloads(split: str, *, as_arrays: bool = True) -> tuple[list, dict]:
    """Ren et al.'s layout: a list of PNG files (numpy uint8 arrays, as cv2.imencode gives them, or
    bytes), and a label dict; images of different classes interleaved, class ids not starting at 0."""
    sizes = TIERED_SIZES[split]
    base = {"train": 0, "validation": 351, "test": 448}[split]
    order = [(c, i) for i in range(max(sizes)) for c in range(len(sizes)) if i < sizes[c]]
    images = []
    for c, i in order:
        png = png_bytes(tagged_image(c, i, 84))
        images.append(np.frombuffer(png, dtype=np.uint8).reshape(-1, 1) if as_arrays else png)
    labels = {"label_specific": np.array([base + c for c, _ in order], dtype=np.int64),
              "label_general": np.zeros(len(order), dtype=np.int64),
              "label_specific_str": [f"n{j:08d}" for j in range(base + len(sizes))]}  # indexed by id
    return images, labels


def write_tiered(root: Path, *, protocol: int = 4, as_arrays: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, short in tieredimagenet.FILE_SPLITS.items():
        images, labels = tiered_payloads(split, as_arrays=as_arrays)
        (root / f"{short}_images_png.pkl").write_bytes(pickle.dumps(images, protocol=protocol))
        (root / f"{short}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=protocol))
    return root


CUB_SPECIES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani",
               "Crested_Auklet", "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet"]


def cub_files(counts: cub.Counts = SMALL_CUB_COUNTS) -> dict[str, bytes]:
    """Paths inside ``CUB_200_2011/`` -> JPEG content, photographs of assorted sizes; species 2 and 5 have
    one more photograph each, and species 1 has an ImageNet duplicate's name."""
    files: dict[str, bytes] = {}
    for c, species in enumerate(CUB_SPECIES[:counts.classes]):
        count = 4 + (c in (1, 4))
        for i in range(count):
            name = f"{species}_{i:04d}_{1000 + c * 10 + i}.jpg"
            if (c, i) == (0, 3):
                name = "Black_Footed_Albatross_0002_55.jpg"  # on Meta-Dataset's ImageNet-duplicate list
            size = (60 + 5 * i, 80 + 3 * c, 3)  # photographs come in all sizes
            pixels = np.random.default_rng(c * 100 + i).integers(0, 256, size, np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            files[f"images/{c + 1:03d}.{species}/{name}"] = buffer.getvalue()
    return files


def write_cub(root: Path, *, as_tgz: bool, files: dict[str, bytes] | None = None) -> Path:
    """The official ``CUB_200_2011.tgz`` in ``root``, or the ``CUB_200_2011/`` folder it extracts to."""
    root.mkdir(parents=True, exist_ok=True)
    files = cub_files() if files is None else files
    if as_tgz:
        with tarfile.open(root / cub.ARCHIVE, "w:gz") as tar:
            for name, data in {"attributes.txt": b"1 has_bill_shape::curved\n",
                               **{f"CUB_200_2011/{k}": v for k, v in files.items()}}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in files.items():
            path = root / "CUB_200_2011" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def py2_pickle(value: object) -> bytes:
    """``value`` (dicts of str keys, lists of ints, uint8 numpy arrays) pickled as Python 2's cPickle
    writes protocol 2: strings and array data as byte strings (BINSTRING), which Python 3 must read as
    latin-1."""
    out = io.BytesIO()
    out.write(b"\x80\x02")

    def binstring(data: bytes) -> None:
        out.write(b"T" + len(data).to_bytes(4, "little") + data)

    def dump(v: object) -> None:
        if isinstance(v, dict):
            out.write(b"}(")
            for key, item in v.items():
                binstring(key.encode())
                dump(item)
            out.write(b"u")
        elif isinstance(v, list):
            out.write(b"](")
            for item in v:
                dump(item)
            out.write(b"e")
        elif isinstance(v, int):
            out.write(b"J" + v.to_bytes(4, "little", signed=True))
        elif isinstance(v, np.ndarray):  # numpy.core.multiarray._reconstruct(ndarray, (0,), 'b') + state
            out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85")
            binstring(b"b")
            out.write(b"\x87R(K\x01")  # TUPLE3 REDUCE, MARK, version 1
            dump_tuple(v.shape)
            out.write(b"cnumpy\ndtype\n")
            binstring(b"u1")
            out.write(b"K\x00K\x01\x87R(K\x03")  # dtype('u1', 0, 1); its state (3, '|', ...)
            binstring(b"|")
            out.write(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")  # ..., BUILD, NEWFALSE
            binstring(np.ascontiguousarray(v).tobytes())
            out.write(b"tb")  # TUPLE, BUILD
        else:
            raise TypeError(type(v))

    def dump_tuple(shape: tuple[int, ...]) -> None:
        out.write(b"(")
        for n in shape:
            out.write(b"J" + n.to_bytes(4, "little"))
        out.write(b"t")

    dump(value)
    out.write(b".")
    return out.getvalue()
