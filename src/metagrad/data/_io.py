"""File plumbing shared by the dataset readers: atomic writes, cache files, downloads, safety checks.

Nothing here knows about a particular dataset. Every failure a user can fix becomes a
:class:`~metagrad.errors.DataError` whose message names the file and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import re
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from metagrad.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
"""Bump when the decoded tensors change (resize, inversion, class order): old caches then go stale."""

MAX_IMAGE_BYTES = 64 << 20
"""The largest image file (or archive member, uncompressed) read: Omniglot's are ~1 KB, ImageNet's JPEGs
under 20 MB. A larger one is a damaged or hostile file (a zip bomb), refused before it is read."""

MAX_IMAGE_PIXELS = 40_000_000
"""The most pixels an image may have (8000 x 5000; ImageNet's largest are ~12 million): a PNG or JPEG
bomb (a small file that decodes to gigabytes) is refused from its header, before it is decoded."""


def show_progress() -> bool:
    """Progress bars only for a person watching: stderr must be a terminal."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    A reader never sees a half-written file: the temporary file is flushed to disk, then renamed
    (``os.replace``, atomic on one file system); an interrupted or failed writer (a full disk) leaves
    the previous ``path`` as it was, and at most a hidden ``.<name>.*.part`` file that nothing reads.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make e.g. config.json private
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())  # the content reaches the disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def no_follow(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that refuses a symbolic link at ``path`` (OSError ELOOP) instead of
    writing to where it points: files in a run folder are written there, never through a link."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`; OSError on failure, ``path`` intact."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path) -> Any:
    """The JSON value in ``path`` (UTF-8).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a regular file (a FIFO would never end the read), not UTF-8, not JSON, or
            nested deeper than Python's parser goes (a RecursionError there, turned into the same error
            as any other text that is not JSON).
    """
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError("it is not a regular file")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply to read") from None


def fingerprint(files: list[tuple[str, os.stat_result]], *, version: int = CACHE_FORMAT_VERSION) -> str:
    """A hex digest of file names, sizes and modification times, plus the cache format version.

    Args:
        files: ``(name, stat)`` pairs; names should be relative so a moved data folder keeps its cache.
        version: cache format version, mixed in so a format change invalidates old caches.
    """
    digest = hashlib.sha256(f"metagrad-cache-v{version}\n".encode())
    for name, st in sorted(files, key=lambda item: item[0]):
        digest.update(os.fsencode(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n"))  # any name's own bytes
    return digest.hexdigest()


def content_digest(value: Any) -> str:
    """SHA-256 of nested dicts, lists and tuples of tensors and plain values (keys, scalars, and each
    tensor's dtype, shape and bytes): the same content gives the same digest however it is stored.

    Example:
        >>> content_digest({"w": torch.zeros(2)}) == content_digest({"w": torch.zeros(2)})
        True
    """
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # the raw bytes, (numel * size,)
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:  # numbers, strings, bools, None: repr is exact (floats round-trip)
        digest.update(f"{type(value).__name__}:{value!r}|".encode())


def cache_file(cache_dir: Path, prefix: str, source: Path) -> Path:
    """The cache file for data read from ``source``: one per source folder, overwritten when stale."""
    where = hashlib.sha256(os.fsencode(source.resolve())).hexdigest()[:16]
    return cache_dir / f"{prefix}-{where}.pt"


def load_cache(path: Path, key: str) -> dict[str, Any] | None:
    """Read a cache file written by :func:`save_cache`; ``None`` when absent, stale or corrupt.

    Loading uses ``torch.load(weights_only=True)``, which admits only tensors and plain containers,
    so a tampered cache cannot run code. A stale or corrupt file is reported and then rebuilt.

    Args:
        path: the cache file.
        key: the :func:`fingerprint` of the source files now; a cache built from other files is stale.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways; each one means "rebuild"
        logger.warning("cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if not isinstance(payload, dict) or payload.get("version") != CACHE_FORMAT_VERSION:
        logger.warning("cache %s has another format (an older metagrad?); rebuilding it", path)
        return None
    if payload.get("key") != key:
        logger.warning("cache %s is stale (the source files changed since it was built); rebuilding it", path)
        return None
    checksum = payload.pop("checksum", None)
    if checksum != content_digest(payload):
        why = "it has no checksum (an older metagrad wrote it)" if checksum is None else \
            "its content does not match its checksum (damaged on disk)"
        logger.warning("cache %s cannot be trusted: %s; rebuilding it", path, why)
        return None
    return payload


def save_tensors(value: Any, handle: BinaryIO) -> None:
    """``torch.save(value, handle)``, a failed write raised as the OSError it is (a full disk, a file-size
    limit): torch raises a RuntimeError ("unexpected pos ...") with the OSError only as its context."""
    try:
        torch.save(value, handle)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def save_cache(path: Path, key: str, **tensors_and_lists: Any) -> None:
    """Write ``{"key", "version", **tensors_and_lists, "checksum"}`` atomically; warn (not fail) if the
    folder is read-only or full. The checksum (:func:`content_digest` of the rest) is verified on load."""
    payload = {"key": key, "version": CACHE_FORMAT_VERSION, **tensors_and_lists}
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as handle:
            save_tensors({**payload, "checksum": content_digest(payload)}, handle)
    except OSError as exc:
        logger.warning(
            "could not write the cache %s (%s); the data will be decoded again next time. "
            "Pass a writable cache_dir (--cache-dir or $METAGRAD_CACHE) to keep it.", path, exc,
        )


def check_member_name(name: str, archive: Path) -> list[str]:
    """The parts of archive entry ``name``; refuse absolute paths and ``..`` (zip slip) with a DataError."""
    normalized = name.replace("\\", "/")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if normalized.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(
            f"{archive} has an unsafe entry {name!r} (an absolute path or '..' could write outside the data "
            "folder); refusing to read it. Get the archive again from its official source."
        )
    return parts


def check_size(size: int, name: str, fix: str) -> None:
    """Refuse file or archive member ``name`` if its ``size`` (uncompressed bytes) is above
    :data:`MAX_IMAGE_BYTES`."""
    if size > MAX_IMAGE_BYTES:
        raise DataError(
            f"{name} is {size:,} bytes (uncompressed), more than any image file should be "
            f"({MAX_IMAGE_BYTES:,}): a damaged or hostile file (a zip bomb?); refusing to read it. {fix}"
        )


def check_file(path: Path, fix: str) -> None:
    """Refuse what is not a regular file (a FIFO would block the read, ``/dev/zero`` never end it) or is
    larger than :data:`MAX_IMAGE_BYTES`."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path} is not a regular file (a device, pipe or socket); refusing to read it. "
                        f"{fix}")
    check_size(st.st_size, str(path), fix)


def read_member(archive: zipfile.ZipFile, entry: str, path: Path, fix: str) -> bytes:
    """Read archive member ``entry`` after checking its declared size, never more than that size.

    ``zipfile`` stops at the declared size and checks the CRC there, so a member that inflates beyond
    what it declares is a ``BadZipFile``, not a memory blow-up.
    """
    info = archive.getinfo(entry)
    check_size(info.file_size, f"{path}: {entry}", fix)
    with archive.open(info) as member:
        return member.read(MAX_IMAGE_BYTES + 1)


GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""Pillow modes of single-channel images (with or without alpha)."""

_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_WHITE = (255, 255, 255, 255)


@contextlib.contextmanager
def open_image(source: bytes | Path, name: str, fix: str) -> Iterator[Image.Image]:
    """Open an image for the block, checked from its header only (pixels are decoded when used).

    Every failure in the block is a DataError naming the file: not a regular file or too large
    (:func:`check_file`, for a path), not an image, corrupt, or above :data:`MAX_IMAGE_PIXELS` (from the
    header, before decoding; Pillow's own decompression-bomb check says the same).

    Args:
        source: the file's bytes, or its path.
        name: how errors name the file (an archive member: ``archive/entry``).
        fix: appended to every error: how to get a good copy.
    """
    try:
        if isinstance(source, Path):
            check_file(source, fix)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise _too_many_pixels(name, width * height, fix)
                yield image
    except (FileNotFoundError, DataError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # above Pillow's own limit
        count = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (900000000 pixels) exceeds ..."
        raise _too_many_pixels(name, int(count.group(1)) if count else None, fix) from None
    except UnidentifiedImageError:
        raise DataError(f"cannot decode {name}: not an image in a format Pillow reads, or corrupt. {fix}"
                        ) from None
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise DataError(f"cannot decode {name} ({exc}): the file is corrupt. {fix}") from None


def _too_many_pixels(name: str, pixels: int | None, fix: str) -> DataError:
    count = f"{pixels:,}" if pixels is not None else "too many"
    return DataError(f"{name} has {count} pixels, more than {MAX_IMAGE_PIXELS:,}: a damaged or hostile image "
                     f"(a decompression bomb?); refusing to decode it. {fix}")


def decode_image(source: bytes | Path, name: str, mode: str, size: int, fix: str) -> np.ndarray:
    """An image file -> (size, size[, channels]) uint8 in PIL ``mode``, Lanczos-resized.

    The file's values are mapped to 0..255 as :func:`to_mode` says (any bit depth, float, alpha).

    Args:
        source: the file's bytes, or its path.
        name: how errors name the file (an archive member: ``archive/entry``).
        mode: PIL mode, ``"L"`` or ``"RGB"``.
        size: pixels per side of the result.
        fix: appended to every error: how to get a good copy.

    Raises:
        DataError: not an image, corrupt, above :data:`MAX_IMAGE_PIXELS` (checked from the header, before
            decoding), or values that cannot be mapped faithfully (see :func:`to_mode`).
    """
    with open_image(source, name, fix) as image:
        return to_mode(image, mode, size, name, fix)


def to_mode(image: Image.Image, mode: str, size: int, name: str, fix: str) -> np.ndarray:
    """``image``'s pixels as (size, size[, 3]) uint8 in ``mode`` (``"L"`` or ``"RGB"``), Lanczos-resized.

    The mapping keeps what the image holds: 8-bit images as they are (Pillow's conversions: a colour
    image to ``"L"`` by ITU-R 601 luma, a grayscale one to ``"RGB"`` by copying it into each channel,
    1-bit 0/1 to 0/255); 16-bit integers 0..65535 and 32-bit integers (Pillow's ``"I"``, read as
    16-bit values) scaled to 0..255; floats must lie in [0, 1] and are scaled likewise (high depths are
    resized before rounding, so no precision is lost to the resize); an alpha channel is composited
    over white, as image viewers show it. Values outside those ranges are refused, not clipped.

    Raises:
        DataError: a float image with values outside [0, 1] (or NaN), an integer image with values
            outside 0..65535: nothing says what they mean as intensities.
    """
    scaled = _unit_range(image, name, fix)
    if scaled is not None:  # (H, W) float32 in [0, 1]: resize in float, round once
        small = np.asarray(Image.fromarray(scaled, "F").resize((size, size), Image.LANCZOS))
        pixels = np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)  # (size, size)
        return pixels if mode == "L" else np.repeat(pixels[..., None], 3, axis=-1)  # (size, size, 3)
    return np.asarray(flatten_alpha(image).convert(mode).resize((size, size), Image.LANCZOS))


def flatten_alpha(image: Image.Image) -> Image.Image:
    """``image`` composited over white when it has an alpha channel or a transparent colour; else itself."""
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def is_colour(image: Image.Image) -> bool:
    """Whether ``image`` shows any colour: False for a grayscale mode and for a colour mode whose pixels
    all have R = G = B (a grayscale picture saved as RGB). Decodes the pixels of a colour mode."""
    if image.mode in GRAY_MODES:
        return False
    rgb = np.asarray(flatten_alpha(image).convert("RGB"))  # (H, W, 3)
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def _unit_range(image: Image.Image, name: str, fix: str) -> np.ndarray | None:
    """(H, W) float32 in [0, 1] for a 16-bit, 32-bit integer or float image; None for 8-bit modes."""
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(values).all() and low >= 0 and high <= 1):
            raise DataError(f"{name} is a floating-point image with values in [{low:g}, {high:g}]; "
                            f"metagrad reads float images as intensities in [0, 1]: rescale it to [0, 1] or "
                            f"save it as an 8- or 16-bit image. {fix}")
        return values
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise DataError(f"{name} is a 32-bit integer image with values in [{low}, {high}]; metagrad "
                            f"reads integer images as 8- or 16-bit intensities (0..65535): save it as an 8- "
                            f"or 16-bit image. {fix}")
        return (values / 65535).astype(np.float32)
    return None


def looks_like_html(head: bytes) -> bool:
    """True when the first bytes of a file are an HTML page (a failed download saved under the data's
    name)."""
    text = head.lstrip().lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<!--"))


def read_head(path: Path, size: int = 512) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def download(url: str, dest: Path, md5: str, *, manual_hint: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file, verify its MD5, then rename it into place.

    Args:
        url: where to fetch from.
        dest: final path; it appears only once the download is complete and verified.
        md5: expected hex digest of the file.
        manual_hint: appended to every error: how to get the file by hand.
        timeout: seconds to wait for the server to answer.

    Raises:
        DataError: no network, a server error, a checksum mismatch, or an unwritable folder.
    """
    logger.info("downloading %s to %s", url, dest)
    created = missing_folders(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(dest) as tmp:
            digest = hashlib.md5()
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                          disable=not show_progress()) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            if digest.hexdigest() != md5:
                raise DataError(
                    f"the download of {url} has MD5 {digest.hexdigest()}, expected {md5} "
                    f"(truncated or altered); nothing was saved. {manual_hint}"
                )
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        remove_if_empty(created)
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url} ({reason}). {manual_hint}") from None
    except OSError as exc:
        remove_if_empty(created)
        raise DataError(f"could not save {dest} ({exc.strerror or exc}). {manual_hint}") from None
    except BaseException:
        remove_if_empty(created)
        raise
    return dest


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    # A failed download should not leave behind the empty folders it made: an empty dataset folder
    # looks like data to the next command and hides the "put the files here" message.
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (another file landed there), already gone, or not ours to remove
            return


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling: numpy arrays and plain containers only.

def _numpy_global(module: str, name: str) -> Any:
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core to numpy._core
    return getattr(getattr(core, module), name)


# module, name -> how to get the object. numpy 1.x pickles say "numpy.core", numpy 2.x "numpy._core".
_SAFE_GLOBALS = {
    **{
        (f"{prefix}.multiarray", name): ("multiarray", name)
        for prefix in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")
    },
    **{
        (f"{prefix}.numeric", "_frombuffer"): ("numeric", "_frombuffer")
        for prefix in ("numpy.core", "numpy._core")
    },
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
    ("_codecs", "encode"): None,  # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, dicts, lists, strings and numbers, and nothing else.

    ``pickle.load`` would call any importable function a file names (``os.system`` included). This
    unpickler resolves only numpy's array-reconstruction helpers, ``numpy.ndarray``, ``numpy.dtype``
    and ``_codecs.encode``; any other global raises :class:`DataError` before anything is called.
    """

    def __init__(self, file: BinaryIO, source: Path | str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (FC100's) hold numpy data as str
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self._source} contains a pickled '{module}.{name}', which is not a numpy array or "
                "plain container; refusing to load it (unpickling it could run arbitrary code). "
                "Use a file with only numpy arrays and plain dicts/lists, from a source you trust."
            )
        target = _SAFE_GLOBALS[(module, name)]
        if target is not None:
            return _numpy_global(*target)
        if module == "numpy":
            return getattr(np, name)
        return super().find_class(module, name)


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`, turning every failure into a clear DataError."""
    head = read_head(path)
    if not head:
        raise DataError(f"{path} is empty (an interrupted download?); delete it and get the file again.")
    with open(path, "rb") as f:
        return _restricted(f, head, path)


def restricted_loads(data: bytes, name: str) -> Any:
    """:func:`restricted_load` for a pickle in memory (an archive member); ``name`` names it in errors."""
    if not data:
        raise DataError(f"{name} is empty; get the file again.")
    return _restricted(io.BytesIO(data), data[:512], name)


def _restricted(file: BinaryIO, head: bytes, path: Path | str) -> Any:
    if looks_like_html(head):
        raise DataError(
            f"{path} is an HTML page, not a pickle: the download link returned a web page (Google Drive "
            "and Dropbox do this for large files). Delete it and download the file again by hand."
        )
    try:
        return RestrictedUnpickler(file, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); it is probably truncated or "
            "corrupt. Delete it and get the file again."
        ) from None
