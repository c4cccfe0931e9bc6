"""The shared image decoder: every encoding of the same picture gives the same pixels, values without a
meaning as intensities are refused, and the size limits hold for every reader."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metagrad.data import _io
from metagrad.errors import DataError

SIDE = 16
LEVELS = np.arange(256, dtype=np.uint8).reshape(SIDE, SIDE)  # every 8-bit intensity once
"""The picture: a ramp through 0..255. Each encoding below stores exactly these intensities."""


def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def _palette(path: Path) -> Path:
    image = Image.fromarray(LEVELS, "L").convert("P")
    return _save(image, path)


ENCODINGS = {
    "8-bit png": lambda p: _save(Image.fromarray(LEVELS, "L"), p / "a.png"),
    "8-bit rgb png": lambda p: _save(Image.fromarray(np.stack([LEVELS] * 3, -1), "RGB"), p / "a.png"),
    "16-bit png": lambda p: _save(Image.fromarray(LEVELS.astype(np.uint16) * 257), p / "a.png"),
    "16-bit tiff": lambda p: _save(Image.fromarray(LEVELS.astype(np.uint16) * 257), p / "a.tif"),
    "32-bit integer tiff": lambda p: _save(Image.fromarray(LEVELS.astype(np.int32) * 257), p / "a.tif"),
    "float tiff in [0, 1]": lambda p: _save(Image.fromarray(LEVELS.astype(np.float32) / 255), p / "a.tif"),
    "opaque gray + alpha png": lambda p: _save(Image.fromarray(LEVELS, "L").convert("LA"), p / "a.png"),
    "opaque rgba png": lambda p: _save(Image.fromarray(LEVELS, "L").convert("RGBA"), p / "a.png"),
    "palette png": lambda p: _palette(p / "a.png"),
}


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_every_encoding_of_a_picture_decodes_to_its_intensities(tmp_path: Path, encoding: str,
                                                                 mode: str) -> None:
    path = ENCODINGS[encoding](tmp_path)
    reference = np.asarray(Image.fromarray(LEVELS, "L").convert(mode).resize((28, 28), Image.LANCZOS))
    pixels = _io.decode_image(path, str(path), mode, 28, "")
    assert pixels.shape == reference.shape and pixels.dtype == np.uint8
    # the same within 1 (high depths are resized in float, then rounded once)
    assert np.abs(pixels.astype(int) - reference).max() <= 1, encoding
    same_size = _io.decode_image(path, str(path), mode, SIDE, "")
    assert np.array_equal(same_size.reshape(SIDE, SIDE, -1)[..., 0], LEVELS)  # not resized: exact


@pytest.mark.parametrize(("values", "what"), [
    (np.full((4, 4), 2.0, np.float32), r"floating-point image with values in \[2, 2\]"),
    (np.full((4, 4), -0.5, np.float32), r"floating-point image with values in \[-0.5, -0.5\]"),
    (np.full((4, 4), np.nan, np.float32), "floating-point image"),
    (np.full((4, 4), 70000, np.int32), r"32-bit integer image with values in \[70000, 70000\]"),
    (np.full((4, 4), -1, np.int32), r"32-bit integer image with values in \[-1, -1\]"),
])
def test_values_without_a_meaning_as_intensities_are_refused_naming_the_file(
        tmp_path: Path, values: np.ndarray, what: str) -> None:
    path = _save(Image.fromarray(values), tmp_path / "odd.tif")
    with pytest.raises(DataError, match=rf"odd\.tif is a {what}.*Replace it"):
        _io.decode_image(path, str(path), "L", 28, "Replace it.")


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((SIDE, SIDE, 4), np.uint8)  # black everywhere
    rgba[:, :8, 3] = 0  # left half fully transparent
    rgba[:, 8:, 3] = 255  # right half opaque
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    pixels = _io.decode_image(path, str(path), "L", SIDE, "")
    assert (pixels[:, :8] == 255).all() and (pixels[:, 8:] == 0).all()
    black_half_opaque = np.stack([LEVELS * 0, np.full_like(LEVELS, 128)], -1)  # (16, 16, 2): gray, alpha
    half = _save(Image.fromarray(black_half_opaque, "LA"), tmp_path / "h.png")
    assert np.abs(_io.decode_image(half, str(half), "L", SIDE, "").astype(int) - 127).max() <= 1


def test_colour_is_judged_by_the_pixels_not_the_mode(tmp_path: Path) -> None:
    gray_rgb = Image.fromarray(np.stack([LEVELS] * 3, -1), "RGB")
    coloured = np.stack([LEVELS] * 3, -1)
    coloured[0, 0] = (255, 0, 0)
    assert not _io.is_colour(gray_rgb) and not _io.is_colour(Image.fromarray(LEVELS, "L"))
    assert _io.is_colour(Image.fromarray(coloured, "RGB"))
    assert not _io.is_colour(Image.fromarray(LEVELS, "L").convert("P"))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (8-bit gray) and whose pixel data is a few bytes:
    what a decompression bomb looks like before it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [13_000, 30_000])  # above metagrad's limit; above Pillow's bomb error too
@pytest.mark.parametrize("source", ["path", "bytes"])  # folders and Mini-ImageNet's JPEGs; archive members
def test_the_pixel_limit_is_checked_from_the_header(tmp_path: Path, side: int, source: str) -> None:
    data = png_header(side, side)
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"bomb\.png has {side * side:,} pixels, more than 40,000,000: "):
        _io.decode_image(path if source == "path" else data, str(path), "L", 28, "")
