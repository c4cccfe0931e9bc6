"""CIFAR-FS (Bertinetto et al., 2019): the 100 CIFAR-100 classes x 600 RGB images at 32x32.

The split is Bertinetto et al.'s: 64 train, 16 validation, 20 test classes. There is no official
download with a published checksum, so metagrad never downloads it; put learn2learn's ``cifar100.zip``
(as distributed on zenodo.org/record/7978538), or the ``cifar100/`` folder it extracts to, in
``<data_dir>/cifar-fs/``. learn2learn's own folder, ``<data_dir>/cifarfs/`` (holding ``cifar100/``), is
read as it is. Either holds ``cifar100/data/<class>/<image>.png`` and the class lists
``cifar100/splits/bertinetto/{train,val,test}.txt`` (one class name per line); ``data/`` and ``splits/``
may also sit directly in the folder or at the zip's top.

Images are read straight from the zip (nothing is extracted), decoded once and cached in the cache
folder. Class order: class names sorted; images of a class sorted by file name.

References:
    Bertinetto, Henriques, Torr and Vedaldi, "Meta-learning with differentiable closed-form solvers",
    ICLR 2019.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io
from metagrad.data._splits import Counts, cached_images, split_counts
from metagrad.errors import DataError

logger = logging.getLogger(__name__)

FOLDER = "cifar-fs"
LEGACY_FOLDERS = ("cifarfs",)  # learn2learn's
ARCHIVE = "cifar100.zip"
TREE = "cifar100"
IMAGE_SIZE = 32
SPLIT_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
SPLITS_DIR = "splits/bertinetto"

SOURCES_HINT = (
    "CIFAR-FS has no official download with a checksum. Get learn2learn's cifar100.zip "
    "(zenodo.org/record/7978538) and put it, or the cifar100/ folder it holds (data/<class>/*.png and "
    "splits/bertinetto/{{train,val,test}}.txt), in {root}."
)


OFFICIAL_COUNTS = Counts((("train", 64), ("validation", 16), ("test", 20)), images=600)


def sources_hint(root: Path) -> str:
    return SOURCES_HINT.format(root=root)


def _tree_folder(folder: Path) -> Path | None:
    """``folder/cifar100/``, or ``folder`` itself when the zip was extracted without its top folder."""
    for tree in (folder / TREE, folder):
        if (tree / SPLITS_DIR).is_dir() and (tree / "data").is_dir():
            return tree
    return None


def _has_files(folder: Path) -> bool:
    return (folder / ARCHIVE).is_file() or _tree_folder(folder) is not None


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/cifar-fs``, else learn2learn's ``<data_dir>/cifarfs``, else ``data_dir`` itself when it
    holds the zip or folder; ``<data_dir>/cifar-fs`` when none does (the error names it)."""
    for folder in (data_dir / FOLDER, *(data_dir / name for name in LEGACY_FOLDERS), data_dir):
        if _has_files(folder):
            return folder
    return data_dir / FOLDER


class _Tree:
    """The files of ``cifar100/``, from the folder or the zip: ``split_classes`` and ``images``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        folder, archive = _tree_folder(root), root / ARCHIVE
        self.zip: zipfile.ZipFile | None = None
        if folder is not None:
            self.source = folder
            self.stats = [(str(f.relative_to(root)), f.stat()) for f in folder.rglob("*") if f.is_file()]
        elif archive.is_file():
            self.source = archive
            self.stats = [(ARCHIVE, archive.stat())]
            try:
                self.zip = zipfile.ZipFile(archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{archive} is not a readable zip ({exc}); delete it and get it again. "
                                f"{sources_hint(root)}") from None
            names = {tuple(_io.check_member_name(n, archive)): n for n in self.zip.namelist()
                     if not n.endswith("/")}
            # the tree's top: where splits/bertinetto/ is (cifar100/ in learn2learn's zip)
            tops = sorted(len(p) - 3 for p in names if p[-3:-1] == tuple(SPLITS_DIR.split("/")))
            top = tops[0] if tops else 0
            self.members = {p[top:]: n for p, n in names.items()}  # path inside the tree -> entry
        else:
            missing = " (the folder does not exist)" if not root.exists() else ""
            raise DataError(f"CIFAR-FS not found: no {ARCHIVE} or {TREE}/ in {root}{missing}. "
                            + sources_hint(root))

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()

    def split_classes(self, split: str) -> list[str]:
        name = SPLIT_FILES[split]
        parts = (*SPLITS_DIR.split("/"), name)
        text = self._read(parts, f"the class list {SPLITS_DIR}/{name}")
        try:
            lines = text.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"{self.source}: {SPLITS_DIR}/{name} is not text. "
                            f"{sources_hint(self.root)}") from None
        classes = [line.strip() for line in lines if line.strip()]
        for cls in classes:
            if "/" in cls or "\\" in cls or cls in (".", ".."):
                raise DataError(f"{self.source}: {SPLITS_DIR}/{name} names {cls!r}, not a class folder")
        return classes

    def images(self, cls: str) -> list[tuple[str, bytes | Path]]:
        """``(name, bytes or path)`` of each image of class ``cls``, sorted by file name."""
        if self.zip is None:
            folder = self.source / "data" / cls
            if not folder.is_dir():
                raise DataError(f"{folder} is missing: the class list names {cls}. {sources_hint(self.root)}")
            return [(str(f), f) for f in sorted(folder.iterdir())
                    if f.is_file() and not f.name.startswith(".")]
        found = sorted(parts for parts in self.members if len(parts) == 3 and parts[:2] == ("data", cls)
                       and not parts[2].startswith("."))
        if not found:
            raise DataError(f"{self.source} has no images of class {cls} (cifar100/data/{cls}/). "
                            f"{sources_hint(self.root)}")
        fix = "Get the archive again."
        return [(f"{self.source}: {self.members[p]}",
                 _io.read_member(self.zip, self.members[p], self.source, fix)) for p in found]

    def _read(self, parts: tuple[str, ...], what: str) -> bytes:
        if self.zip is None:
            path = self.source.joinpath(*parts)
            if not path.is_file():
                raise DataError(f"{path} ({what}) is missing. {sources_hint(self.root)}")
            return path.read_bytes()
        if parts not in self.members:
            raise DataError(f"{self.source} has no {'/'.join(parts)} ({what}). "
                            f"{sources_hint(self.root)}")
        return _io.read_member(self.zip, self.members[parts], self.source, "Get the archive again.")


def load_split(root: Path, split: str, cache_dir: Path, *, split_scheme: str = "bertinetto",
               counts: Counts | None = None) -> tuple[Tensor, list[str]]:
    """One split as ``(images (classes, 600, 3, 32, 32) uint8, class_names)``.

    Raises:
        DataError: missing, malformed, unsafe or incomplete files (the message names the file).
    """
    counts = counts or OFFICIAL_COUNTS  # read at call time, so tests can patch it
    tree = _Tree(root)
    try:
        names = sorted(tree.split_classes(split))
        if len(names) != counts.classes_in(split) or len(set(names)) != len(names):
            raise DataError(f"{tree.source}: {SPLITS_DIR}/{SPLIT_FILES[split]} lists {len(names)} classes; "
                            f"CIFAR-FS's '{split}' split has {counts.classes_in(split)} distinct ones. "
                            f"{sources_hint(root)}")
        key = _io.fingerprint(tree.stats)
        cache = _io.cache_file(cache_dir, f"cifar-fs-{split}", tree.source)
        cached = cached_images(cache, key, (len(names), counts.images, 3, IMAGE_SIZE, IMAGE_SIZE), names)
        if cached is not None:
            return cached, names
        logger.info("decoding CIFAR-FS '%s' from %s (once; cached in %s)", split, tree.source, cache)
        out = np.empty((len(names), counts.images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for c, cls in enumerate(tqdm(names, desc=f"Decoding CIFAR-FS {split} (once)", unit="class",
                                     disable=not _io.show_progress())):
            files = tree.images(cls)
            if len(files) != counts.images:
                raise DataError(f"{tree.source}: class {cls} has {len(files)} images, expected "
                                f"{counts.images}. The copy is incomplete. {sources_hint(root)}")
            for i, (name, source) in enumerate(files):
                out[c, i] = _decode(source, name)
    finally:
        tree.close()
    # (classes, images, 32, 32, 3) -> (classes, images, 3, 32, 32)
    images = torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()
    _io.save_cache(cache, key, images=images, class_names=names)
    return images, names


def _decode(source: bytes | Path, name: str) -> np.ndarray:
    fix = "Get the data again."
    if isinstance(source, Path):
        _io.check_file(source, fix)
    image = _io.decode_image(source, name, "RGB", IMAGE_SIZE, fix)
    return image


def info(root: Path, cache_dir: Path, *, split_scheme: str = "bertinetto") -> dict:
    """Facts about the data under ``root``; loads (and caches) each split."""
    splits = {}
    for split in SPLIT_FILES:
        images, names = load_split(root, split, cache_dir)
        splits[split] = split_counts([images.shape[1]] * len(names))
    return {"dataset": "cifar-fs", "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE], "splits": splits,
            "root": str(root), "split_scheme": split_scheme}
