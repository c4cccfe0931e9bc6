"""Omniglot (Lake et al., 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Input, in ``<data_dir>/omniglot/`` (or ``<data_dir>`` itself): the two official archives
``images_background.zip`` and ``images_evaluation.zip``, or the same trees already extracted
(``images_background/<Alphabet>/characterNN/<id>_NN.png``). Supplied data is validated by content
(50 alphabets, 1623 characters, 20 drawings each), not by checksum, because re-packed copies exist;
downloaded archives are checked against the official MD5s.

Decoding happens once: every PNG is read straight out of its archive, converted to grayscale, resized
to 28x28 with Lanczos (as the MAML paper and learn2learn do) and inverted so ink is 255 and background
0 (learn2learn's ``1 - ToTensor()``). The result, one uint8 tensor (1623, 20, 1, 28, 28), is cached in
the cache folder (one file per data folder) and rebuilt when the source files change.

Class order (fixed): ``images_background`` then ``images_evaluation``; within each, alphabets sorted by
name, then character folders sorted by name (``Alphabet_of_the_Magi/character01`` is class 0,
``ULOG/character26`` is class 1622). Drawings within a character are sorted by file name.

Split schemes (deterministic, independent of any random state; ``"shuffled"`` is the default and the
presets'):

- ``"maml"``: classes [0, 1100) train, [1100, 1200) validation, [1200, 1623) test (Finn et al.'s
  walkthrough, with the fixed order above instead of a seeded shuffle). The test classes are then
  exactly Vinyals et al.'s 423 (below): 13 alphabets of ``images_evaluation``, none of them seen in
  training (validation holds 3 alphabets, one of them shared with the test).
- ``"shuffled"``: the same 1100 / 100 / 423 cut of the 1623 characters in a fixed random order
  (``numpy.random.RandomState(1).permutation`` of the order above), as MAML's code does: it pools the
  alphabets of both archives in one folder and shuffles the characters (``random.seed(1)`` over
  ``os.listdir`` order, which no one can reproduce exactly) before cutting. Test characters then
  come from alphabets that training has also seen, an easier test than ``"maml"``'s.
- ``"vinyals"``: 1028 / 172 / 423 characters, the split of Vinyals et al. as published with the
  Prototypical Networks code (``splits/vinyals/{train,val,test}.txt``; torchmeta ships the same lists).
  In the order above it is: test = classes [1200, 1623) (the last 423 characters, from
  ``Gurmukhi/character42`` to the end); validation = the 172 characters of five background alphabets
  (Armenian, Bengali, Early_Aramaic, Hebrew, Mkhedruli_(Georgian)); train = the other 1028 of [0, 1200).

Rotations (option ``rotations``, default True): each character rotated by 0, 90, 180 and 270 degrees
counter-clockwise (``torch.rot90``) is a class of its own, the protocol of Vinyals et al., ProtoNets
and MAML, so every split has 4x the classes. Rotation is applied after splitting, so the four
rotations of a character always fall in the same split.

References:
    Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through probabilistic program
    induction", Science 2015. Data: https://github.com/brendenlake/omniglot
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io
from metagrad.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

FOLDER = "omniglot"
IMAGE_SET_NAMES = ("images_background", "images_evaluation")  # class order: background first
DOWNLOAD_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{name}.zip"
OFFICIAL_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
IMAGE_SIZE = 28  # pixels per side after resizing
SPLIT_SCHEMES = ("maml", "vinyals", "shuffled")
DEFAULT_SPLIT_SCHEME = "shuffled"  # the papers' protocol
SHUFFLE_SEED = 1  # "shuffled": numpy.random.RandomState(SHUFFLE_SEED).permutation of the class order
MAML_SPLITS = {"train": (0, 1100), "validation": (1100, 1200), "test": (1200, 1623)}  # [start, stop) classes
VINYALS_TRAINVAL = 1200  # classes [0, 1200) are train + validation, the rest test
VINYALS_VALIDATION_ALPHABETS = frozenset(
    {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
)
ROTATIONS = 4  # 0, 90, 180, 270 degrees
_GET_AGAIN = "Get the official archives again."


@dataclass(frozen=True)
class Counts:
    """What a complete copy holds; tests pass a smaller one for their fixtures."""

    alphabets: int = 50
    characters: int = 1623
    drawings: int = 20  # per character


OFFICIAL_COUNTS = Counts()


@dataclass
class _ImageSet:
    """One of images_background / images_evaluation: an archive or a folder, and its PNG entries."""

    name: str
    path: Path
    is_zip: bool
    # (alphabet, character) -> sorted entry names (zip members, or paths relative to ``path``)
    characters: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    stats: list[tuple[str, os.stat_result]] = field(default_factory=list)


@dataclass
class _Listing:
    root: Path
    sets: list[_ImageSet]

    @property
    def class_names(self) -> list[str]:
        return [f"{alphabet}/{character}" for s in self.sets for alphabet, character in s.characters]


def _manual_hint(root: Path) -> str:
    urls = " and ".join(DOWNLOAD_URL.format(name=name) for name in IMAGE_SET_NAMES)
    return (
        f"Download {urls} and put the two zip files (or their extracted folders) in {root}, "
        "or run `metagrad data download omniglot --data-dir DIR` on a machine with internet access."
    )


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/omniglot``, or ``data_dir`` itself when it directly holds the Omniglot files."""
    nested = data_dir / FOLDER
    if not _present_sets(nested) and _present_sets(data_dir):
        return data_dir
    return nested


def _present_sets(root: Path) -> list[str]:
    return [n for n in IMAGE_SET_NAMES if (root / f"{n}.zip").is_file() or (root / n).is_dir()]


def download(data_dir: Path) -> Path:
    """Fetch the official archives that are missing from ``<data_dir>/omniglot`` and check their MD5s.

    Archives or folders already there are kept (and validated by content when loaded).

    Returns:
        The folder that holds the archives.

    Raises:
        DataError: no network, a checksum mismatch, or a folder that cannot be written.
    """
    root = find_root(data_dir)
    present = _present_sets(root)
    for name in IMAGE_SET_NAMES:
        if name in present:
            logger.debug("%s already present in %s", name, root)
            continue
        _io.download(DOWNLOAD_URL.format(name=name), root / f"{name}.zip", OFFICIAL_MD5[name],
                     manual_hint=_manual_hint(root))
    return root


def _layout_error(path: Path, entry: str) -> DataError:
    return DataError(
        f"{path}: unexpected entry {entry!r}. Omniglot's layout is "
        "images_background/<Alphabet>/characterNN/<drawing>.png (and the same for images_evaluation). "
        + "Get the official archives again, or re-extract them without changing the folders."
    )


def _skip(parts: Sequence[str]) -> bool:
    """Hidden files and macOS resource folders that re-packed archives often carry."""
    return parts[0] == "__MACOSX" or any(p[0] == "." for p in parts)


def _list_zip(name: str, path: Path) -> _ImageSet:
    image_set = _ImageSet(name, path, is_zip=True, stats=[(path.name, path.stat())])
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        what = "an HTML page" if _io.looks_like_html(_io.read_head(path)) else "not a valid zip archive"
        raise DataError(
            f"{path} is {what} ({exc}); it is probably a truncated or failed download. "
            f"Delete it and get it again: {_manual_hint(path.parent)}"
        ) from None
    characters: dict[tuple[str, str], list[str]] = defaultdict(list)
    for info in infos:
        parts = _io.check_member_name(info.filename, path)
        if info.is_dir() or not parts or _skip(parts) or not parts[-1].lower().endswith(".png"):
            continue
        if len(parts) != 4 or parts[0] != name:
            raise _layout_error(path, info.filename)
        _io.check_size(info.file_size, f"{path}: {info.filename}", _GET_AGAIN)  # before anything is inflated
        characters[(parts[1], parts[2])].append(info.filename)
    image_set.characters = {key: sorted(characters[key]) for key in sorted(characters)}
    return image_set


def _list_folder(name: str, path: Path) -> _ImageSet:
    image_set = _ImageSet(name, path, is_zip=False)
    characters: dict[tuple[str, str], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not _skip([d])]
        rel = Path(dirpath).relative_to(path)
        pngs = sorted(f for f in filenames if f.lower().endswith(".png") and not _skip([f]))
        if not pngs:
            continue
        if len(rel.parts) != 2:
            raise _layout_error(path, str(rel / pngs[0]))
        characters[(rel.parts[0], rel.parts[1])] = [str(rel / f) for f in pngs]
        image_set.stats.extend((f"{name}/{rel / f}", os.stat(Path(dirpath) / f)) for f in pngs)
    image_set.characters = {key: characters[key] for key in sorted(characters)}
    return image_set


def list_images(root: Path, counts: Counts | None = None) -> _Listing:
    """Find both image sets under ``root`` and check their layout and counts (cheap: no image is decoded).

    ``counts`` defaults to :data:`OFFICIAL_COUNTS` (read at call time, so tests can patch it).

    Raises:
        DataError: missing sets, a corrupt archive, an unexpected layout, or wrong counts.
    """
    sets = []
    for name in IMAGE_SET_NAMES:
        archive, folder = root / f"{name}.zip", root / name
        if archive.is_file():  # the archive wins: it is written atomically, a folder may be half-extracted
            sets.append(_list_zip(name, archive))
        elif folder.is_dir():
            sets.append(_list_folder(name, folder))
    if not sets:
        where = f"{root} does not exist" if not root.exists() else f"{root} holds no Omniglot files"
        raise DataError(f"Omniglot not found: {where}. {_manual_hint(root)}")
    if len(sets) == 1:
        missing = next(n for n in IMAGE_SET_NAMES if n != sets[0].name)
        raise DataError(f"{root} has {sets[0].name} but not {missing} (.zip or folder). {_manual_hint(root)}")
    listing = _Listing(root, sets)
    _check_counts(listing, counts or OFFICIAL_COUNTS)
    return listing


def _check_counts(listing: _Listing, counts: Counts) -> None:
    found = {s.name: (len({a for a, _ in s.characters}), len(s.characters)) for s in listing.sets}
    alphabets = sum(a for a, _ in found.values())
    characters = sum(c for _, c in found.values())
    if (alphabets, characters) != (counts.alphabets, counts.characters):
        detail = ", ".join(f"{name}: {a} alphabets / {c} characters" for name, (a, c) in found.items())
        raise DataError(
            f"Omniglot in {listing.root} has {alphabets} alphabets and {characters} characters ({detail}); "
            f"a complete copy has {counts.alphabets} alphabets and {counts.characters} characters. "
            "Files are missing or were added: get the official archives again. "
            + _manual_hint(listing.root)
        )
    wrong = [
        (f"{s.name}/{a}/{c}", len(files))
        for s in listing.sets for (a, c), files in s.characters.items() if len(files) != counts.drawings
    ]
    if wrong:
        (first, n), more = wrong[0], len(wrong) - 1
        raise DataError(
            f"Omniglot character {first} has {n} drawings, expected {counts.drawings}"
            + (f" ({more} more characters have the wrong count)" if more else "")
            + f". Get the official archives again. {_manual_hint(listing.root)}"
        )


def _cache_key(listing: _Listing) -> str:
    return _io.fingerprint([(f"{FOLDER}/{name}", st) for s in listing.sets for name, st in s.stats])


def cache_path(root: Path, cache_dir: Path) -> Path:
    """Where the decoded tensor of the data under ``root`` is cached."""
    return _io.cache_file(cache_dir, "omniglot", root)


def _decode_png(data: bytes, entry: str) -> np.ndarray:
    """PNG bytes -> (28, 28) uint8 with ink = 255: grayscale, Lanczos resize, then invert (as learn2learn)."""
    small = _io.decode_image(data, entry, "L", IMAGE_SIZE, _GET_AGAIN)
    return 255 - small  # the files draw black ink on white; we want ink = 255


def _decode(listing: _Listing, counts: Counts) -> Tensor:
    """All drawings as (characters, drawings, 1, 28, 28) uint8, ink = 255, in listing order."""
    out = np.empty((counts.characters, counts.drawings, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    archives: dict[Path, zipfile.ZipFile] = {}
    characters = [(s, files) for s in listing.sets for files in s.characters.values()]
    try:
        bar = tqdm(characters, desc="Decoding Omniglot (once)", unit="char", disable=not _io.show_progress())
        for c, (image_set, files) in enumerate(bar):
            for d, entry in enumerate(files):
                out[c, d, 0] = _decode_png(_read(image_set, entry, archives), f"{image_set.path}/{entry}")
    finally:
        for archive in archives.values():
            archive.close()
    return torch.from_numpy(out)


def _read(image_set: _ImageSet, entry: str, archives: dict[Path, zipfile.ZipFile]) -> bytes:
    try:
        if not image_set.is_zip:
            path = image_set.path / entry
            _io.check_file(path, _GET_AGAIN)
            return path.read_bytes()
        if image_set.path not in archives:
            archives[image_set.path] = zipfile.ZipFile(image_set.path)
        return _io.read_member(archives[image_set.path], entry, image_set.path, _GET_AGAIN)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read {entry} from {image_set.path} ({exc}): the archive or folder is corrupt. "
            "Get the official archives again."
        ) from None


def load_images(root: Path, cache_dir: Path, *, counts: Counts | None = None) -> tuple[Tensor, list[str]]:
    """All of Omniglot as one tensor, decoded once and cached.

    Args:
        root: the folder holding the archives or extracted folders (see :func:`find_root`).
        cache_dir: where the decoded tensor is cached.
        counts: expected counts; None means :data:`OFFICIAL_COUNTS` (tests use small fixtures).

    Returns:
        ``(images, class_names)``: images (characters, drawings, 1, 28, 28) uint8 with ink = 255, in the
        documented class order; class_names ``"Alphabet/characterNN"``, one per character.

    Raises:
        DataError: missing, corrupt or incomplete data.
    """
    counts = counts or OFFICIAL_COUNTS
    listing = list_images(root, counts)
    names = listing.class_names
    path, key = cache_path(root, cache_dir), _cache_key(listing)
    cached = _io.load_cache(path, key)
    if cached is not None:
        images = cached.get("images")
        shape = (counts.characters, counts.drawings, 1, IMAGE_SIZE, IMAGE_SIZE)
        if isinstance(images, Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == shape \
                and cached.get("class_names") == names:
            logger.debug("loaded Omniglot from cache %s", path)
            return images, names
        logger.warning("cache %s holds unexpected contents; rebuilding it", path)
    logger.info("decoding Omniglot from %s (once; cached in %s)", root, path)
    images = _decode(listing, counts)
    _io.save_cache(path, key, images=images, class_names=names)
    return images, names


def split_classes(class_names: Sequence[str], scheme: str) -> dict[str, list[int]]:
    """Class indices of each split, for characters in the documented order.

    Args:
        class_names: ``"Alphabet/characterNN"`` for all 1623 characters, in the documented order.
        scheme: ``"maml"``, ``"vinyals"`` or ``"shuffled"`` (see the module docstring).

    Returns:
        ``{"train": [...], "validation": [...], "test": [...]}`` disjoint lists of class indices.
    """
    if scheme == "maml":
        return {split: list(range(start, stop)) for split, (start, stop) in MAML_SPLITS.items()}
    if scheme == "shuffled":
        order = np.random.RandomState(SHUFFLE_SEED).permutation(len(class_names)).tolist()
        return {split: sorted(order[start:stop]) for split, (start, stop) in MAML_SPLITS.items()}
    if scheme == "vinyals":
        alphabets = [name.split("/")[0] for name in class_names]
        trainval = range(min(VINYALS_TRAINVAL, len(class_names)))
        return {
            "train": [i for i in trainval if alphabets[i] not in VINYALS_VALIDATION_ALPHABETS],
            "validation": [i for i in trainval if alphabets[i] in VINYALS_VALIDATION_ALPHABETS],
            "test": list(range(VINYALS_TRAINVAL, len(class_names))),
        }
    raise ConfigError(f"unknown Omniglot split_scheme {scheme!r}; choose one of {', '.join(SPLIT_SCHEMES)}")


def rotate(images: Tensor, class_names: Sequence[str]) -> tuple[Tensor, list[str]]:
    """Make each rotation by 0/90/180/270 degrees (counter-clockwise) a class of its own.

    Args:
        images: (C, S, 1, H, W) with H == W.
        class_names: C names.

    Returns:
        ``(rotated, names)``: rotated (C*4, S, 1, H, W), the four rotations of a class consecutive;
        names with a suffix ``"/rot000"``, ``"/rot090"``, ``"/rot180"``, ``"/rot270"``.
    """
    rotated = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(ROTATIONS)], dim=1)
    c, r, s = rotated.shape[:3]
    names = [f"{name}/rot{90 * k:03d}" for name in class_names for k in range(ROTATIONS)]
    return rotated.reshape(c * r, s, *rotated.shape[3:]), names  # (C, 4, S, 1, H, W) -> (C*4, S, 1, H, W)


def load_split(
    root: Path, split: str, cache_dir: Path, *, split_scheme: str = DEFAULT_SPLIT_SCHEME,
    rotations: bool = True, counts: Counts | None = None,
) -> tuple[Tensor, list[str]]:
    """One split as ``(images (classes, 20, 1, 28, 28) uint8, class_names)``; see the module docstring."""
    images, names = load_images(root, cache_dir, counts=counts)
    indices = split_classes(names, split_scheme)[split]
    images, names = images[indices], [names[i] for i in indices]
    if rotations:
        images, names = rotate(images, names)
    return images, names


def info(root: Path, cache_dir: Path, *, split_scheme: str = DEFAULT_SPLIT_SCHEME) -> dict:
    """Facts about the data under ``root`` from its file listing (nothing is decoded).

    Returns:
        ``{"dataset", "image_shape", "splits": {split: {"classes", "images_per_class"}}, "split_scheme",
        "root", "sources", "cache", "cached"}``, counting characters before rotation.
    """
    listing = list_images(root)
    splits = split_classes(listing.class_names, split_scheme)
    return {
        "dataset": "omniglot",
        "image_shape": [1, IMAGE_SIZE, IMAGE_SIZE],
        "splits": {
            split: {"classes": len(indices), "images_per_class": OFFICIAL_COUNTS.drawings}
            for split, indices in splits.items()
        },
        "split_scheme": split_scheme,
        "root": str(root),
        "sources": [str(s.path) for s in listing.sets],
        "cache": str(cache_path(root, cache_dir)),
        "cached": cache_path(root, cache_dir).is_file(),
    }
