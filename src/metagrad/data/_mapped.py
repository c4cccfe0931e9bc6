"""Memory-mapped image caches, for splits too large to hold in memory (tiered-ImageNet's train split is
448,695 images of 3x84x84, 9.5 GB as uint8).

A cache is two files in the cache folder: ``<stem>.u8``, the raw pixels (total_images, C, H, W) uint8 in
class order, and ``<stem>.json``, what they are (source fingerprint, shape, class sizes and names).
Both are written through temporary files and renamed; the JSON last, so a reader that finds it finds
complete pixels. Opening maps the pixels copy-on-write (nothing is ever written through
the map) and returns a tensor over them plus a function that drops the pages read so far from the
process's resident memory (``madvise(MADV_DONTNEED)``; the kernel's page cache keeps them, so reading
them again costs a page fault, not a disk read). Samplers call it after each meta-batch, which bounds
the map's share of the resident set by about one meta-batch's pages whatever the cache's size.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metagrad.data import _io

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class MappedImages:
    """An opened cache: ``images`` (total, C, H, W) uint8 over the mapped file."""

    images: Tensor
    class_sizes: tuple[int, ...]
    class_names: list[str]
    release_pages: Callable[[], None]


def paths(cache_dir: Path, stem: str) -> tuple[Path, Path]:
    """The pixel file and the metadata file of cache ``stem``."""
    return cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"


def open_cache(cache_dir: Path, stem: str, key: str) -> MappedImages | None:
    """Map cache ``stem`` if it is complete and built from the sources ``key`` names; else None.

    A stale (other sources), older-format or truncated cache is reported and None returned, so the
    caller rebuilds it. The pixels are not checksummed (that would read the whole file at every open):
    a cache damaged in place is rebuilt by deleting it.
    """
    data, meta_path = paths(cache_dir, stem)
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        shape, sizes, names = tuple(meta["shape"]), tuple(meta["class_sizes"]), list(meta["class_names"])
        fresh = meta.get("version") == FORMAT_VERSION and meta.get("key") == key
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cache %s is unreadable (%s); rebuilding it", meta_path, exc)
        return None
    if not fresh:
        logger.warning("cache %s is stale or has another format; rebuilding it", meta_path)
        return None
    try:
        size = data.stat().st_size
    except OSError:
        size = -1
    if len(shape) != 4 or sum(sizes) != shape[0] or size != int(np.prod(shape)) or len(names) != len(sizes):
        logger.warning("cache %s does not match its description (truncated?); rebuilding it", data)
        return None
    with open(data, "rb") as f:
        # copy-on-write: a writable buffer for torch, and a write through it could never reach the file
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    images = torch.frombuffer(mapped, dtype=torch.uint8).view(shape)  # (total, C, H, W), no copy

    def release_pages() -> None:
        mapped.madvise(mmap.MADV_DONTNEED)

    return MappedImages(images, sizes, names, release_pages)


@contextmanager
def build_cache(cache_dir: Path, stem: str, key: str, shape: tuple[int, int, int, int],
                class_sizes: tuple[int, ...], class_names: list[str]
                ) -> Iterator[Callable[[int, np.ndarray], None]]:
    """Yield ``put(index, image)``, which writes image ``index`` (C, H, W) uint8 of the cache; on success
    rename the pixels into place, then write the metadata, both atomically. A failure or Ctrl-C leaves no
    new cache (a previous one, if any, as it was).

    Images go to the file with positioned writes, so the process holds one image at a time, not the
    split: the kernel writes the pages back as it needs.
    """
    data, meta_path = paths(cache_dir, stem)
    item = int(np.prod(shape[1:]))
    with _io.atomic_write(data) as tmp:
        with open(tmp, "r+b") as out:
            out.truncate(shape[0] * item)
            fd = out.fileno()

            def put(index: int, image: np.ndarray) -> None:
                if image.shape != shape[1:] or image.dtype != np.uint8:
                    raise ValueError(f"image {index} is {image.dtype} {image.shape}, "
                                     f"expected uint8 {shape[1:]}")
                os.pwrite(fd, np.ascontiguousarray(image).data, index * item)

            yield put
        meta = {"version": FORMAT_VERSION, "key": key, "shape": list(shape), "class_sizes": list(class_sizes),
                "class_names": class_names}
        meta_path.unlink(missing_ok=True)  # the old description must not outlive the old pixels
    _io.write_text_atomically(meta_path, json.dumps(meta))
