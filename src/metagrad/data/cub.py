"""CUB-200-2011 (Wah et al., 2011): 200 bird species, 11,788 photographs, 41 to 60 per species.

Put the official archive ``CUB_200_2011.tgz`` (downloaded, and checked against its published MD5, when
missing), or the ``CUB_200_2011/`` folder it extracts to, in ``<data_dir>/cub/``; learn2learn's
folder, ``<data_dir>/cubirds200/``, is read as it is. Images are read from ``CUB_200_2011/images/
<NNN.Species>/<file>.jpg`` (straight from the archive: nothing is extracted), converted to RGB and
resized to 84x84 with Lanczos (the whole photograph, aspect ratio not kept), once for all 200 classes,
and cached. Each class keeps all of its images (the split is ragged, see
:class:`~metagrad.data.FewShotDataset`).

Two class splits (option ``split_scheme``), by the species' numbers 1-200:

- ``"chen"`` (the default), Chen et al. 2019's 100 / 50 / 50: of the species in number order, the
  1st, 3rd, 5th... train, the 2nd, 6th, 10th... validation, the 4th, 8th, 12th... test.
- ``"triantafillou"``, Meta-Dataset's 140 / 30 / 30 (Triantafillou et al. 2020, learn2learn's
  ``CUBirds200``), without the 43 photographs that are also in ILSVRC-2012's training set (Meta-Dataset
  leaves them out so that a model pre-trained on ImageNet has not seen them).

Class order: species number ascending; images of a class by file name.

References:
    Wah, Branson, Welinder, Perona and Belongie, "The Caltech-UCSD Birds-200-2011 Dataset", 2011.
    Chen, Liu, Kira, Wang and Huang, "A Closer Look at Few-shot Classification", ICLR 2019.
    Triantafillou et al., "Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples",
    ICLR 2020.
"""

from __future__ import annotations

import logging
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io
from metagrad.data._splits import split_counts
from metagrad.errors import DataError

logger = logging.getLogger(__name__)

FOLDER = "cub"
LEGACY_FOLDERS = ("cubirds200",)  # learn2learn's
ARCHIVE = "CUB_200_2011.tgz"
TREE = "CUB_200_2011"
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"  # published with the archive on CaltechDATA
IMAGE_SIZE = 84
SPLIT_SCHEMES = ("chen", "triantafillou")

# Meta-Dataset's split (learn2learn's CUBirds200), by species number.
TRIANTAFILLOU_SPLITS = {
    "validation": (44, 51, 52, 55, 57, 61, 64, 66, 68, 72, 76, 80, 84, 96, 113, 121, 127, 136, 140, 145, 150,
                   155, 159, 162, 172, 176, 178, 198, 199, 200),
    "test": (8, 9, 15, 20, 28, 30, 35, 39, 45, 46, 82, 85, 94, 101, 103, 112, 118, 122, 128, 133, 134, 137,
             147, 148, 163, 168, 169, 170, 193, 194),
}  # train: the other 140
# The photographs that are also in ILSVRC-2012's training set (Meta-Dataset's list), by file name.
IMAGENET_DUPLICATES = frozenset({
    'American_Goldfinch_0012_32338.jpg', 'American_Goldfinch_0018_32324.jpg',
    'American_Goldfinch_0062_31921.jpg', 'American_Goldfinch_0064_32142.jpg',
    'American_Goldfinch_0116_31943.jpg', 'American_Goldfinch_0131_32911.jpg',
    'Anna_Hummingbird_0034_56614.jpg', 'Black_Footed_Albatross_0002_55.jpg',
    'Black_Footed_Albatross_0024_796089.jpg', 'Black_Footed_Albatross_0033_796086.jpg',
    'Black_Footed_Albatross_0086_796062.jpg', 'Blue_Jay_0033_62024.jpg', 'Blue_Jay_0049_63082.jpg',
    'Blue_Jay_0053_62744.jpg', 'Blue_Jay_0068_61543.jpg', 'Dark_Eyed_Junco_0031_66785.jpg',
    'Dark_Eyed_Junco_0037_66321.jpg', 'Dark_Eyed_Junco_0057_68650.jpg', 'Dark_Eyed_Junco_0102_67402.jpg',
    'Dark_Eyed_Junco_0104_67820.jpg', 'Dark_Eyed_Junco_0111_66488.jpg', 'Green_Violetear_0002_795699.jpg',
    'Indigo_Bunting_0010_13000.jpg', 'Indigo_Bunting_0031_13300.jpg', 'Indigo_Bunting_0051_12837.jpg',
    'Indigo_Bunting_0060_14495.jpg', 'Indigo_Bunting_0063_11820.jpg', 'Indigo_Bunting_0071_11639.jpg',
    'Indigo_Bunting_0072_14197.jpg', 'Indigo_Bunting_0073_13933.jpg', 'Laysan_Albatross_0033_658.jpg',
    'Laysan_Albatross_0049_918.jpg', 'Laysan_Albatross_0053_543.jpg', 'Mallard_0067_77623.jpg',
    'Red_Breasted_Merganser_0001_79199.jpg', 'Red_Breasted_Merganser_0004_79232.jpg',
    'Red_Breasted_Merganser_0012_79425.jpg', 'Red_Breasted_Merganser_0034_79292.jpg',
    'Red_Breasted_Merganser_0045_79358.jpg', 'Red_Breasted_Merganser_0068_79203.jpg',
    'Red_Breasted_Merganser_0083_79562.jpg', 'Ruby_Throated_Hummingbird_0040_57982.jpg',
    'Ruby_Throated_Hummingbird_0090_57411.jpg',
})

SOURCES_HINT = (
    "Get CUB_200_2011.tgz from its official page, data.caltech.edu/records/65de6-vp158 "
    "(metagrad downloads it when download is on: 'metagrad data download cub'), and put it, or the "
    "CUB_200_2011/ folder it extracts to, in {root}."
)


@dataclass(frozen=True)
class Counts:
    """Species and photographs of a complete copy; tests pass smaller ones."""

    classes: int = 200
    images: int = 11788


OFFICIAL_COUNTS = Counts()


def sources_hint(root: Path) -> str:
    return SOURCES_HINT.format(root=root)


def _has_files(folder: Path) -> bool:
    return (folder / ARCHIVE).is_file() or (folder / TREE / "images").is_dir()


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/cub``, else learn2learn's ``<data_dir>/cubirds200``, else ``data_dir`` itself when it
    holds the archive or folder; ``<data_dir>/cub`` when none does."""
    for folder in (data_dir / FOLDER, *(data_dir / name for name in LEGACY_FOLDERS), data_dir):
        if _has_files(folder):
            return folder
    return data_dir / FOLDER


def download(data_dir: Path) -> Path:
    """Fetch the official archive into ``<data_dir>/cub/`` unless the data is there; verify its MD5."""
    root = find_root(data_dir)
    if not _has_files(root):
        _io.download(URL, root / ARCHIVE, MD5, manual_hint=sources_hint(root))
    return root


def class_ids(split: str, split_scheme: str, classes: int | None = None) -> list[int]:
    """The species numbers (1-based) of ``split`` ("all" for every species) under ``split_scheme``, of
    ``classes`` species (default: all 200)."""
    numbers = list(range(1, (classes or OFFICIAL_COUNTS.classes) + 1))
    if split == "all":
        return numbers
    if split_scheme == "chen":  # Chen et al.'s write_CUB_filelist.py, on 0-based positions
        keep = {"train": lambda i: i % 2 == 0, "validation": lambda i: i % 4 == 1,
                "test": lambda i: i % 4 == 3}[split]
        return [n for i, n in enumerate(numbers) if keep(i)]
    if split in TRIANTAFILLOU_SPLITS:
        return list(TRIANTAFILLOU_SPLITS[split])
    held_out = {n for ids in TRIANTAFILLOU_SPLITS.values() for n in ids}
    return [n for n in numbers if n not in held_out]


def _species_number(folder: str) -> int | None:
    head = folder.split(".", 1)[0]
    return int(head) if head.isdigit() and "." in folder else None


def _decode_all(root: Path, counts: Counts) -> tuple[Tensor, list[str], list[int], list[str]]:
    """Every photograph: images (N, 3, 84, 84), class names, class sizes, file names (class order)."""
    fix = "Get the data again."
    found: dict[str, list[tuple[str, np.ndarray]]] = {}
    folder, archive = root / TREE / "images", root / ARCHIVE
    bar = tqdm(total=counts.images, desc="Decoding CUB-200-2011 (once)", unit="img",
               disable=not _io.show_progress())

    def keep(species: str, name: str, source: bytes | Path, label: str) -> None:
        if _species_number(species) is None or name.startswith("."):
            return
        found.setdefault(species, []).append((name, _io.decode_image(source, label, "RGB", IMAGE_SIZE, fix)))
        bar.update()

    try:
        if folder.is_dir():
            for species in sorted(d for d in folder.iterdir() if d.is_dir()):
                for file in sorted(f for f in species.iterdir() if f.is_file()):
                    if not file.name.startswith("."):
                        _io.check_file(file, fix)
                    keep(species.name, file.name, file, str(file))
        else:
            try:
                with tarfile.open(archive, mode="r:*") as tar:
                    for member in tar:
                        parts = _io.check_member_name(member.name, archive)
                        if len(parts) < 4 or parts[-4:-2] != [TREE, "images"] or not member.isfile():
                            continue
                        _io.check_size(member.size, f"{archive}: {member.name}", fix)
                        handle = tar.extractfile(member)
                        if handle is None:
                            continue
                        keep(parts[-2], parts[-1], handle.read(_io.MAX_IMAGE_BYTES + 1),
                             f"{archive}: {member.name}")
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise DataError(f"{archive} is not a readable .tgz archive ({exc}): truncated or corrupt. "
                                f"Delete it and get it again. {sources_hint(root)}") from None
    finally:
        bar.close()
    names = sorted(found, key=lambda s: _species_number(s) or 0)
    total = sum(len(v) for v in found.values())
    numbers = [_species_number(s) for s in names]
    if numbers != list(range(1, counts.classes + 1)) or total != counts.images:
        source = folder if folder.is_dir() else archive
        raise DataError(f"{source} holds {len(names)} species folders and {total} images; CUB-200-2011 has "
                        f"{counts.classes} (001 to {counts.classes:03d}) and {counts.images}. The copy is "
                        f"incomplete. {sources_hint(root)}")
    files, pixels = [], []
    for species in names:
        for name, image in sorted(found[species], key=lambda item: item[0]):
            files.append(name)
            pixels.append(image)
    # (N, 84, 84, 3) -> (N, 3, 84, 84)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return images, names, [len(found[s]) for s in names], files


def load_classes(root: Path, cache_dir: Path, numbers: list[int], *, exclude_duplicates: bool,
                 counts: Counts | None = None) -> tuple[Tensor, list[str], tuple[int, ...]]:
    """The photographs of species ``numbers`` (ascending) as ``(images (total, 3, 84, 84) uint8,
    class_names, class_sizes)``, without ILSVRC-2012's duplicates if asked. Decodes (once) and caches all.

    Raises:
        DataError: missing, unreadable or incomplete data (the message names the file).
    """
    counts = counts or OFFICIAL_COUNTS  # read at call time, so tests can patch it
    folder, archive = root / TREE / "images", root / ARCHIVE
    if folder.is_dir():
        stats = [(str(f.relative_to(root)), f.stat()) for f in folder.rglob("*")
                 if stat.S_ISREG(f.stat().st_mode)]
        source = folder
    elif archive.is_file():
        stats, source = [(ARCHIVE, archive.stat())], archive
    else:
        missing = " (the folder does not exist)" if not root.exists() else ""
        raise DataError(f"CUB-200-2011 not found: no {ARCHIVE} or {TREE}/images/ in {root}{missing}. "
                        + sources_hint(root))
    key = _io.fingerprint(stats)
    cache = _io.cache_file(cache_dir, "cub", source)
    cached = _io.load_cache(cache, key)
    if cached is not None and _valid(cached):
        images, names, sizes, files = (cached["images"], cached["class_names"], cached["class_sizes"],
                                       cached["files"])
    else:
        if cached is not None:
            logger.warning("cache %s holds unexpected contents; rebuilding it", cache)
        logger.info("decoding CUB-200-2011 from %s (once; cached in %s)", source, cache)
        images, names, sizes, files = _decode_all(root, counts)
        _io.save_cache(cache, key, images=images, class_names=names, class_sizes=sizes, files=files)
    starts = np.cumsum([0, *sizes])
    rows, kept_names, kept_sizes = [], [], []
    for number in numbers:
        c = number - 1
        chosen = [i for i in range(starts[c], starts[c + 1])
                  if not (exclude_duplicates and files[i] in IMAGENET_DUPLICATES)]
        rows.extend(chosen)
        kept_names.append(names[c])
        kept_sizes.append(len(chosen))
    return images[torch.tensor(rows, dtype=torch.int64)], kept_names, tuple(kept_sizes)


def _valid(cached: dict) -> bool:
    images, sizes, files = cached.get("images"), cached.get("class_sizes"), cached.get("files")
    return (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and isinstance(sizes, list) and isinstance(files, list)
            and sum(sizes) == len(files) == len(images)
            and isinstance(cached.get("class_names"), list) and len(cached["class_names"]) == len(sizes))


def load_split(root: Path, split: str, cache_dir: Path, *, split_scheme: str = "chen",
               counts: Counts | None = None) -> tuple[Tensor, list[str], tuple[int, ...]]:
    """One split as ``(images (total, 3, 84, 84) uint8, class_names, class_sizes)``."""
    counts = counts or OFFICIAL_COUNTS
    numbers = class_ids(split, split_scheme, counts.classes)
    return load_classes(root, cache_dir, numbers, exclude_duplicates=split_scheme == "triantafillou",
                        counts=counts)


def info(root: Path, cache_dir: Path, *, split_scheme: str = "chen") -> dict:
    """Facts about the data under ``root``; decodes (and caches) it on first use."""
    splits = {}
    for split in ("train", "validation", "test"):
        _, _, sizes = load_split(root, split, cache_dir, split_scheme=split_scheme)
        splits[split] = split_counts(sizes)
    return {"dataset": "cub", "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE], "splits": splits,
            "root": str(root), "split_scheme": split_scheme}
