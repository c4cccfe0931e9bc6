"""tiered-ImageNet (Ren et al., 2018): 608 ImageNet classes in 34 categories, 84x84 RGB, 732 to 1300
images per class.

The split is by category: 351 train classes (448,695 images), 97 validation (124,261), 160 test
(206,209). There is no official download with a published checksum, so metagrad never downloads it; put
the files of Ren et al.'s release (github.com/renmengye/few-shot-ssl-public; learn2learn's copy is on
zenodo.org/record/7978538) in ``<data_dir>/tiered-imagenet/``, learn2learn's place:
``{train,val,test}_images_png.pkl`` (a pickled list of PNG-encoded images, as numpy byte arrays or
bytes) and ``{train,val,test}_labels.pkl`` (a dict whose ``"label_specific"`` gives each image's class
id, and ``"label_specific_str"``, if present, the class names).

The image pickles are never unpickled: they are scanned opcode by opcode (``pickletools``, which runs
nothing), each PNG decoded as it is met and written to a memory-mapped cache (:mod:`._mapped`), so
neither decoding (once) nor sampling holds the split in memory. A pickle naming anything but numpy's
array helpers is refused. The label pickles are small and read with the restricted unpickler.

Class order: class ids ascending; images of a class in file order.

References:
    Ren et al., "Meta-Learning for Semi-Supervised Few-Shot Classification", ICLR 2018.
"""

from __future__ import annotations

import logging
import pickletools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import Tensor
from tqdm import tqdm

from metagrad.data import _io, _mapped
from metagrad.data._splits import Counts, split_counts
from metagrad.errors import DataError

logger = logging.getLogger(__name__)

FOLDER = "tiered-imagenet"
IMAGE_SIZE = 84
FILE_SPLITS = {"train": "train", "validation": "val", "test": "test"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the globals a pickled list of numpy byte arrays names (numpy 1.x and 2.x, protocols 2 to 5)
ALLOWED_GLOBALS = frozenset(
    {(f"{core}.{module}", name) for core in ("numpy.core", "numpy._core")
     for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                          ("numeric", "_frombuffer"))}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)

SOURCES_HINT = (
    "tiered-ImageNet has no official download with a checksum. Get Ren et al.'s "
    "{{train,val,test}}_images_png.pkl and {{train,val,test}}_labels.pkl "
    "(github.com/renmengye/few-shot-ssl-public; learn2learn's copy on zenodo.org/record/7978538, there "
    "named tiered-imagenet-<file>) and put them in {root}."
)


OFFICIAL_COUNTS = Counts((("train", 351), ("validation", 97), ("test", 160)))  # 732 to 1300 images each


def sources_hint(root: Path) -> str:
    return SOURCES_HINT.format(root=root)


def find_root(data_dir: Path) -> Path:
    """``<data_dir>/tiered-imagenet``, or ``data_dir`` itself when it directly holds the files."""
    nested = data_dir / FOLDER
    if not (nested / "train_labels.pkl").is_file() and (data_dir / "train_labels.pkl").is_file():
        return data_dir
    return nested


def _files(root: Path, split: str) -> tuple[Path, Path]:
    short = FILE_SPLITS[split]
    images, labels = root / f"{short}_images_png.pkl", root / f"{short}_labels.pkl"
    missing = [p.name for p in (images, labels) if not p.is_file()]
    if missing:
        where = " (the folder does not exist)" if not root.exists() else ""
        raise DataError(f"tiered-ImageNet split '{split}' not found: no {' or '.join(missing)} in "
                        f"{root}{where}. {sources_hint(root)}")
    return images, labels


def read_labels(path: Path, split: str, counts: Counts) -> tuple[np.ndarray, list[str]]:
    """Each image's class index (N,) int64 in [0, classes), classes in ascending id order, and the names."""
    data = _io.restricted_load(path)
    ids = data.get("label_specific") if isinstance(data, dict) else None
    if ids is None:
        raise DataError(f"{path} is not a tiered-ImageNet label file: expected a dict with 'label_specific', "
                        f"found {type(data).__name__}"
                        + (f" with keys {sorted(map(str, data))}" if isinstance(data, dict) else "")
                        + f". {sources_hint(path.parent)}")
    try:
        ids = np.asarray(ids).astype(np.int64, casting="safe").reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'label_specific' must be integers ({exc}).") from None
    classes, index = np.unique(ids, return_inverse=True)
    if len(classes) != counts.classes_in(split):
        raise DataError(f"{path} holds {len(classes)} classes; tiered-ImageNet's '{split}' split has "
                        f"{counts.classes_in(split)}. The file is incomplete or belongs to another split. "
                        f"{sources_hint(path.parent)}")
    strings = data.get("label_specific_str")
    if isinstance(strings, (list, tuple, np.ndarray)) and classes.min() >= 0 \
            and len(strings) > int(classes.max()):
        names = [_text(strings[int(c)]) for c in classes]
    else:
        names = [str(int(c)) for c in classes]
    return index.astype(np.int64), names


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def png_payloads(path: Path) -> Iterator[bytes]:
    """The PNG files in a pickle, in order, without unpickling it (pickletools runs nothing).

    Raises:
        DataError: the pickle names a global other than numpy's array helpers, or cannot be parsed.
    """
    # What STACK_GLOBAL takes are the two values pushed last, strings pushed directly or fetched from the
    # memo: follow both (short strings only: the memo of a protocol-2 pickle would also hold every PNG).
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                name = opcode.name
                if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
                    module, attr = (arg.split(" ", 1) if isinstance(arg, str)
                                    else [str(v) for v in pushed[-2:]] if len(pushed) >= 2 else ["?", "?"])
                    if (module, attr) not in ALLOWED_GLOBALS:
                        raise DataError(
                            f"{path} contains a pickled '{module}.{attr}', which is not a numpy array or "
                            "plain container; refusing to read it (unpickling it could run arbitrary code). "
                            f"{sources_hint(path.parent)}")
                if name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                    continue
                if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                    continue
                if name in ("FRAME", "PROTO", "STOP"):
                    continue
                value = memo.get(int(arg)) if name in ("GET", "BINGET", "LONG_BINGET") else None
                if isinstance(arg, str):
                    if arg.startswith("\x89PNG"):  # protocols 0-2 and Python 2 hold bytes as latin-1 text
                        yield arg.encode("latin-1")
                    elif len(arg) < 256:
                        value = arg
                elif isinstance(arg, (bytes, bytearray)) and arg.startswith(PNG_SIGNATURE):
                    yield bytes(arg)
                pushed = [*pushed[-1:], value]
    except DataError:
        raise
    except (ValueError, EOFError, UnicodeEncodeError) as exc:
        raise DataError(f"{path} is not a readable pickle ({exc}); it is probably truncated or corrupt. "
                        f"{sources_hint(path.parent)}") from None


def load_split(root: Path, split: str, cache_dir: Path, *, split_scheme: str = "ren",
               counts: Counts | None = None
               ) -> tuple[Tensor, list[str], tuple[int, ...], Callable[[], None]]:
    """One split as ``(images (total, 3, 84, 84) uint8, class_names, class_sizes, release_pages)``, the
    images memory-mapped from the cache (built on first use).

    Raises:
        DataError: missing, malformed, unsafe or incomplete files (the message names the file).
    """
    counts = counts or OFFICIAL_COUNTS  # read at call time, so tests can patch it
    images_path, labels_path = _files(root, split)
    key = _io.fingerprint([(p.name, p.stat()) for p in (images_path, labels_path)])
    stem = _io.cache_file(cache_dir, f"tiered-imagenet-{split}", root).stem
    mapped = _mapped.open_cache(cache_dir, stem, key)
    if mapped is None:
        _build(images_path, labels_path, split, cache_dir, stem, key, counts)
        mapped = _mapped.open_cache(cache_dir, stem, key)
        if mapped is None:
            raise DataError(f"the cache {_mapped.paths(cache_dir, stem)[0]} could not be written or read "
                            "back; pass a writable cache folder with free space (--cache-dir or "
                            "$METAGRAD_CACHE)")
    return mapped.images, mapped.class_names, mapped.class_sizes, mapped.release_pages


def _build(images_path: Path, labels_path: Path, split: str, cache_dir: Path, stem: str, key: str,
           counts: Counts) -> None:
    labels, names = read_labels(labels_path, split, counts)
    sizes = np.bincount(labels, minlength=len(names))
    # where each image of the file goes: class after class, file order within a class
    destination = np.empty(len(labels), dtype=np.int64)
    destination[np.argsort(labels, kind="stable")] = np.arange(len(labels))
    shape = (len(labels), 3, IMAGE_SIZE, IMAGE_SIZE)
    logger.info("decoding tiered-ImageNet '%s' from %s (once; memory-mapped cache in %s)", split, images_path,
                cache_dir)
    fix = "Get the file again."
    try:
        with _mapped.build_cache(cache_dir, stem, key, shape, tuple(int(s) for s in sizes), names) as put:
            found = 0
            bar = tqdm(png_payloads(images_path), total=len(labels), unit="img",
                       desc=f"Decoding tiered-ImageNet {split} (once)", disable=not _io.show_progress())
            for found, png in enumerate(bar, start=1):
                if found > len(labels):
                    break
                pixels = _io.decode_image(png, f"{images_path}: image {found - 1}", "RGB", IMAGE_SIZE, fix)
                put(int(destination[found - 1]), pixels.transpose(2, 0, 1))  # (84, 84, 3) -> (3, 84, 84)
            if found != len(labels):
                more = "more than" if found > len(labels) else "only"
                raise DataError(f"{images_path} holds {more} {min(found, len(labels))} PNG images but "
                                f"{labels_path.name} labels {len(labels)}; the files are incomplete or do "
                                f"not belong together. {sources_hint(images_path.parent)}")
    except OSError as exc:
        raise DataError(f"could not write the cache in {cache_dir} ({exc.strerror or exc}); tiered-ImageNet "
                        f"'{split}' needs {np.prod(shape) / 1e9:.1f} GB there. Pass a writable cache folder "
                        "with room (--cache-dir or $METAGRAD_CACHE).") from None


def info(root: Path, cache_dir: Path, *, split_scheme: str = "ren") -> dict:
    """Facts about the data under ``root``: the label files alone, nothing is decoded."""
    splits = {}
    for split in FILE_SPLITS:
        _, labels_path = _files(root, split)
        labels, _ = read_labels(labels_path, split, OFFICIAL_COUNTS)
        splits[split] = split_counts(np.bincount(labels).tolist())
    return {"dataset": "tiered-imagenet", "image_shape": [3, IMAGE_SIZE, IMAGE_SIZE], "splits": splits,
            "root": str(root), "split_scheme": split_scheme}
