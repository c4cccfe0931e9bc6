"""Few-shot datasets: classes x samples image tensors, plus a name -> loader registry.

Entry points: :func:`load_dataset` (one split as a :class:`FewShotDataset`), :func:`dataset_info`
(the facts ``metagrad data info`` prints) and :func:`download`. Data comes from ``data_dir``
(:func:`resolve_data_dir`); decoded tensors are cached in ``cache_dir`` (:func:`resolve_cache_dir`),
so the data folder may be read-only. Each dataset's module documents its formats, class order and splits:
:mod:`metagrad.data.omniglot`, :mod:`metagrad.data.miniimagenet`, :mod:`metagrad.data.cifarfs`,
:mod:`metagrad.data.fc100`, :mod:`metagrad.data.tieredimagenet`, :mod:`metagrad.data.cub`,
:mod:`metagrad.data.folder` (your own images, one folder per class).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad.data import cifarfs, cub, fc100, folder, miniimagenet, omniglot, tieredimagenet
from metagrad.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "SPLITS",
    "FewShotDataset",
    "dataset_info",
    "download",
    "load_dataset",
    "resolve_cache_dir",
    "resolve_data_dir",
]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class FewShotDataset:
    """One split of a few-shot dataset, decoded once into a single uint8 tensor.

    Classes may hold different numbers of images (CUB: 41 to 60, tiered-ImageNet: 732 to 1300): then
    ``images`` is flat, the classes one after another, and ``class_sizes`` says how many each has. Every
    consumer reads both layouts through ``sizes``, ``offsets`` and ``flat_images``.

    Attributes:
        name: dataset name in the registry, e.g. ``"omniglot"``.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        images: (num_classes, images_per_class, C, H, W) uint8 when every class has the same number of
            images; with ``class_sizes``, (total_images, C, H, W) uint8, class 0's images first.
        class_names: one human-readable name per class, in the order of ``images``.
        class_sizes: images per class when they differ (they sum to ``images.shape[0]``); None: equal.
        release_pages: for an ``images`` tensor memory-mapped from a cache file, drops the pages read so far
            from the process's resident memory (they stay in the page cache); samplers call it after each
            gather. None for tensors in memory.
    """

    name: str
    split: str
    images: Tensor
    class_names: list[str] = field(default_factory=list)
    class_sizes: tuple[int, ...] | None = None
    release_pages: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        dims = 5 if self.class_sizes is None else 4
        layout = "(classes, samples, C, H, W)" if dims == 5 else "(total_images, C, H, W) with class_sizes"
        if self.images.dtype != torch.uint8 or self.images.dim() != dims:
            raise ValueError(
                f"images must be a uint8 tensor {layout}, got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.class_sizes is not None:
            sizes = tuple(self.class_sizes)
            if not sizes or min(sizes) < 1 or sum(sizes) != self.images.shape[0]:
                raise ValueError(f"class_sizes must be positive and sum to the {self.images.shape[0]} "
                                 f"images, got {len(sizes)} sizes summing to {sum(sizes)}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0] if self.class_sizes is None else len(self.class_sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Images in each class."""
        if self.class_sizes is None:
            return (self.images.shape[1],) * self.images.shape[0]
        return tuple(self.class_sizes)

    @property
    def images_per_class(self) -> int:
        """Images in every class when they are equal; else the smallest class's count."""
        return self.images.shape[1] if self.class_sizes is None else min(self.class_sizes)

    @property
    def offsets(self) -> Tensor:
        """(num_classes,) int64: where each class starts in ``flat_images``."""
        sizes = torch.tensor(self.sizes, dtype=torch.int64)
        return sizes.cumsum(0) - sizes

    @property
    def flat_images(self) -> Tensor:
        """(total_images, C, H, W) uint8, a view of ``images``: class 0's images, then class 1's..."""
        return self.images if self.class_sizes is not None else self.images.flatten(0, 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[-3:]
        return (c, h, w)


@dataclass(frozen=True)
class _Spec:
    """How to find, load, describe and download one dataset."""

    find_root: Callable[..., Path]  # (data_dir, **root options)
    # (root, split, cache_dir, **options) -> the leading FewShotDataset fields after name and split:
    # (images, class_names[, class_sizes[, release_pages]])
    load_split: Callable[..., tuple]
    info: Callable[..., dict]  # (root, cache_dir, **options)
    download: Callable[[Path], Path] | None
    options: dict[str, tuple[Any, ...] | type]  # option name -> allowed values, or the type of a free value
    root_options: tuple[str, ...] = ()  # required options that locate the data (go to find_root)
    sources_hint: Callable[[Path], str] | None = None  # where the files come from, for those not downloaded


def _reader(module: Any, options: dict[str, tuple[Any, ...] | type],
            root_options: tuple[str, ...] = ()) -> _Spec:
    """The ``_Spec`` of a reader module: its ``find_root``, ``load_split``, ``info``, and its ``download``
    where it has one, else its ``sources_hint`` (where the files are distributed) where it has one."""
    download = getattr(module, "download", None)
    return _Spec(find_root=module.find_root, load_split=module.load_split, info=module.info,
                 download=download, options=options, root_options=root_options,
                 sources_hint=None if download is not None else getattr(module, "sources_hint", None))


DATASETS: dict[str, _Spec] = {
    "omniglot": _reader(omniglot, {"split_scheme": omniglot.SPLIT_SCHEMES, "rotations": (True, False)}),
    "mini-imagenet": _reader(miniimagenet, {"split_scheme": ("ravi",)}),  # Ravi & Larochelle's 64/16/20
    "cifar-fs": _reader(cifarfs, {"split_scheme": ("bertinetto",)}),  # Bertinetto et al.'s 64/16/20
    "fc100": _reader(fc100, {"split_scheme": ("oreshkin",)}),  # Oreshkin et al.'s superclass split, 60/20/20
    "tiered-imagenet": _reader(tieredimagenet, {"split_scheme": ("ren",)}),  # Ren et al.'s, 351/97/160
    # Chen et al.'s 100/50/50, Meta-Dataset's 140/30/30
    "cub": _reader(cub, {"split_scheme": cub.SPLIT_SCHEMES}),
    # a user's own: <data_dir>/<folder>/{train,validation,test}/<class>/<image>; the split is the folder's
    "folder": _reader(folder, {"split_scheme": ("folders",), "folder": str}, root_options=("folder",)),
}
"""Dataset name -> how to load it. ``name in DATASETS`` checks a name."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$METAGRAD_DATA``, else ``$XDG_DATA_HOME/metagrad``
    (``~/.local/share/metagrad`` when ``XDG_DATA_HOME`` is unset).

    Each dataset lives in a subfolder (``omniglot/``, ``mini-imagenet/``).
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get("METAGRAD_DATA"):
        return Path(os.environ["METAGRAD_DATA"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "metagrad"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$METAGRAD_CACHE``, else ``$XDG_CACHE_HOME/metagrad``
    (``~/.cache/metagrad`` when ``XDG_CACHE_HOME`` is unset)."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    if os.environ.get("METAGRAD_CACHE"):
        return Path(os.environ["METAGRAD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metagrad"


def _spec(name: str) -> _Spec:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _check_options(name: str, spec: _Spec, options: dict[str, Any]) -> None:
    for key, value in options.items():
        if key not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise ConfigError(f"dataset {name!r} has no option {key!r}; its options: {valid}")
        allowed = spec.options[key]
        if isinstance(allowed, type):
            if not isinstance(value, allowed):
                raise ConfigError(f"{name} option {key}={value!r} must be a {allowed.__name__}")
            continue
        # bool is an int subclass and 1 == True: compare types too, so rotations=1 is refused
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(
                f"{name} option {key}={value!r} is not valid; choose one of {', '.join(map(repr, allowed))}"
            )


def _root_options(name: str, spec: _Spec, options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the options that locate the data (``folder``); each is required."""
    missing = [key for key in spec.root_options if key not in options]
    if missing:
        raise ConfigError(f"dataset {name!r} needs option(s) {', '.join(missing)} "
                          f"(config data.{missing[0]}): the data is {folder.LAYOUT}")
    return {key: options.pop(key) for key in spec.root_options}


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    **options: Any,
) -> FewShotDataset:
    """Load one split of a dataset as a single uint8 tensor, decoding (once) and caching as needed.

    Args:
        name: a key of :data:`DATASETS`: ``"omniglot"``, ``"mini-imagenet"``, ``"cifar-fs"``, ``"fc100"``,
            ``"tiered-imagenet"``, ``"cub"`` or ``"folder"`` (your own images,
            ``<data_dir>/<folder>/{train,validation,test}/<class>/<image>``; see :mod:`metagrad.data.folder`).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        data_dir: folder holding ``omniglot/``, ``mini-imagenet/``, ...; see :func:`resolve_data_dir`.
        cache_dir: folder for decoded caches; see :func:`resolve_cache_dir`.
        download: fetch missing files when the dataset has an official download (Omniglot, CUB).
        **options: Omniglot: ``split_scheme="shuffled"`` (the default: 1100/100/423 of the characters in
            a fixed random order, as MAML's code), ``"maml"`` (the same cut of the sorted order) or
            ``"vinyals"`` (1028/172/423), and ``rotations=True`` (each 90-degree rotation is its own
            class: 4x the classes). Mini-ImageNet: ``split_scheme="ravi"`` (64/16/20, the only choice).
            Folder: ``folder="<name>"`` (required) and ``split_scheme="folders"`` (the only choice).
            CUB: ``split_scheme="chen"`` (100/50/50, the default) or ``"triantafillou"`` (140/30/30).
            CIFAR-FS (``"bertinetto"``), FC100 (``"oreshkin"``), tiered-ImageNet (``"ren"``): one each.

    Returns:
        A :class:`FewShotDataset` with ``images`` (classes, images_per_class, C, H, W) uint8:
        Omniglot (4400 | 400 | 1692, 20, 1, 28, 28) with rotations, ink = 255;
        Mini-ImageNet (64 | 16 | 20, 600, 3, 84, 84) RGB; CIFAR-FS (64 | 16 | 20, 600, 3, 32, 32);
        FC100 (60 | 20 | 20, 600, 3, 32, 32); a folder (classes, n, 1, 28, 28) grayscale or (classes, n, 3,
        84, 84) RGB. Classes of different sizes give flat images (total, C, H, W) with ``class_sizes``:
        CUB (3, 84, 84), 41-60 per class; tiered-ImageNet (3, 84, 84), 732-1300 per class, memory-mapped
        from the cache; a folder whose classes differ.

    Raises:
        ConfigError: unknown dataset, split or option, or a missing ``folder``.
        DataError: missing, corrupt or incomplete data (the message says how to get it).

    Example:
        >>> train = load_dataset("omniglot", "train", data_dir="data")  # doctest: +SKIP
        >>> train.images.shape
        torch.Size([4400, 20, 1, 28, 28])
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for {name}; valid splits: {', '.join(SPLITS)}")
    _check_options(name, spec, options)
    located = _root_options(name, spec, options)
    data_root = resolve_data_dir(data_dir)
    if download and spec.download is not None:
        root = spec.download(data_root)  # fetches only what is missing
    else:
        root = spec.find_root(data_root, **located)
    loaded = spec.load_split(root, split, resolve_cache_dir(cache_dir), **options)
    return FewShotDataset(name, split, *loaded)


def dataset_info(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> dict:
    """The facts ``metagrad data info`` prints. Never downloads.

    Returns:
        A JSON-ready dict: ``{"dataset": name, "image_shape": [C, H, W], "splits": {"train":
        {"classes": n, "images_per_class": k}, "validation": {...}, "test": {...}}, "root": ..., ...}``;
        a split whose classes differ in size has ``{"classes", "images", "min_images_per_class",
        "max_images_per_class"}``.
        Omniglot counts characters before rotation (1100 / 100 / 423 with the default split) and reads
        only the file listing; Mini-ImageNet loads each split (building its cache if needed).

    Raises:
        ConfigError: unknown dataset or option.
        DataError: missing, corrupt or incomplete data.
    """
    spec = _spec(name)
    _check_options(name, spec, options)
    located = _root_options(name, spec, options)
    options.pop("rotations", None)  # counts are before rotation either way
    root = spec.find_root(resolve_data_dir(data_dir), **located)
    return spec.info(root, resolve_cache_dir(cache_dir), **options)


def download(name: str, *, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Fetch a dataset's missing files into ``data_dir`` and verify them; return the dataset folder.

    Raises:
        ConfigError: unknown dataset.
        DataError: the dataset has no official download (Mini-ImageNet: the message says where the files
            come from), no network, or a checksum mismatch.
    """
    spec = _spec(name)
    data_root = resolve_data_dir(data_dir)
    if spec.root_options:
        raise DataError(f"{name} is your own data: put it in {data_root} as {folder.LAYOUT}")
    if spec.download is None:
        root = spec.find_root(data_root)
        hint = spec.sources_hint(root) if spec.sources_hint else ""
        raise DataError(f"{name} cannot be downloaded automatically. {hint}")
    root = spec.download(data_root)
    spec.info(root, resolve_cache_dir(None))  # validate what is there now (layout and counts)
    return root
