"""Omniglot reader: formats, class order, pixels, validation, safety, cache, splits, rotations, real data."""

from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import (
    REAL_DATA_DIR,
    SMALL_COUNTS,
    SMALL_OMNIGLOT,
    drawing_png,
    omniglot_entries,
    write_omniglot_folders,
    write_omniglot_zips,
)
from PIL import Image

from metagrad.data import EpisodeSampler, _io, dataset_info, load_dataset, omniglot
from metagrad.errors import DataError

# Characters per alphabet of the real data set (SOURCE.md of ../shared/data/omniglot), in class order.
REAL_ALPHABETS = {
    "images_background": {
        "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
        "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
        "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
        "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43,
        "Greek": 24, "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
        "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
        "Malay_(Jawi_-_Arabic)": 40, "Mkhedruli_(Georgian)": 41, "N_Ko": 33,
        "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42, "Syriac_(Estrangelo)": 23,
        "Tagalog": 17, "Tifinagh": 55,
    },
    "images_evaluation": {
        "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26, "Ge_ez": 26,
        "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40,
        "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28,
        "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
    },
}


def real_class_names() -> list[str]:
    return [
        f"{alphabet}/character{c:02d}"
        for image_set in omniglot.IMAGE_SET_NAMES
        for alphabet in sorted(REAL_ALPHABETS[image_set])
        for c in range(1, REAL_ALPHABETS[image_set][alphabet] + 1)
    ]


def reference_pixels(png: bytes) -> np.ndarray:
    """learn2learn's transform, written out: grayscale, Resize(28, LANCZOS), 1 - ToTensor (in uint8)."""
    image = Image.open(io.BytesIO(png)).convert("L").resize((28, 28), Image.LANCZOS)
    return 255 - np.asarray(image)


def load_small(root: Path, cache_dir: Path):
    return omniglot.load_images(root, cache_dir, counts=SMALL_COUNTS)


# ---------------------------------------------------------------------------------------------- formats


def test_zips_decode_in_documented_order_with_learn2learn_pixels(small_omniglot: Path,
                                                                 tmp_path: Path) -> None:
    images, names = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert images.shape == (10, 20, 1, 28, 28) and images.dtype == torch.uint8
    # background before evaluation, alphabets sorted by name, characters sorted
    assert names == [
        "Braille/character01", "Greek/character01", "Greek/character02", "Latin/character01",
        "Latin/character02", "Latin/character03", "Angelic/character01", "Angelic/character02",
        "Tengwar/character01", "Tengwar/character02",
    ]
    entries = list(omniglot_entries())
    for c, d in [(0, 0), (4, 7), (9, 19)]:
        _, _, png = entries[c * 20 + d]
        np.testing.assert_array_equal(images[c, d, 0].numpy(), reference_pixels(png))
    # ink = 255 on a background of 0: strokes cover a small part of each drawing
    assert images.float().mean() < 80 and images.max() == 255 and images.min() == 0


def test_extracted_folders_give_the_same_tensor(small_omniglot: Path, tmp_path: Path) -> None:
    zipped, names = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    folders = write_omniglot_folders(tmp_path / "extracted")
    unzipped, names2 = load_small(folders, tmp_path / "cache")
    assert names2 == names
    assert torch.equal(zipped, unzipped)


def test_one_zip_and_one_folder(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "mixed")
    with zipfile.ZipFile(root / "images_evaluation.zip") as zf:
        zf.extractall(root)
    (root / "images_evaluation.zip").unlink()
    images, _ = load_small(root, tmp_path / "cache")
    assert images.shape[0] == 10


def test_hidden_files_and_macos_folders_are_ignored(tmp_path: Path) -> None:
    junk = {"__MACOSX/images_background/._x.png": b"junk", "images_background/Latin/.DS_Store": b"junk",
            "images_background/README.txt": b"text"}
    root = write_omniglot_zips(tmp_path / "o", extra={"images_background": junk})
    images, _ = load_small(root, tmp_path / "cache")
    assert images.shape[0] == 10


def test_data_dir_may_point_at_the_omniglot_folder_itself(small_omniglot: Path) -> None:
    assert omniglot.find_root(small_omniglot) == small_omniglot / "omniglot"
    assert omniglot.find_root(small_omniglot / "omniglot") == small_omniglot / "omniglot"


# ---------------------------------------------------------------------------------------------- bad input


def test_default_validation_wants_the_complete_data_set(small_omniglot: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError,
                       match=r"has 5 alphabets and 10 characters.*50 alphabets and 1623 characters"):
        omniglot.load_images(small_omniglot / "omniglot", tmp_path / "cache")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({**SMALL_OMNIGLOT, "images_background": {"Latin": 3, "Greek": 2}},
         r"has 4 alphabets and 9 characters"),
        ({**SMALL_OMNIGLOT, "images_evaluation": {"Tengwar": 2, "Angelic": 3}}, r"11 characters"),
    ],
)
def test_wrong_alphabet_or_character_counts(tmp_path: Path, layout, message: str) -> None:
    root = write_omniglot_zips(tmp_path / "o", layout)
    with pytest.raises(DataError, match=message):
        load_small(root, tmp_path / "cache")


def test_missing_drawing_is_named(tmp_path: Path) -> None:
    skip = {"images_background/Greek/character02/0003_05.png"}
    root = write_omniglot_zips(tmp_path / "o", skip=skip)
    with pytest.raises(DataError, match=r"images_background/Greek/character02 has 19 drawings, expected 20"):
        load_small(root, tmp_path / "cache")


def test_missing_or_empty_folder_says_how_to_get_the_data(tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):
        with pytest.raises(DataError,
                           match=r"Omniglot not found.*images_background\.zip.*put the two zip files"):
            load_small(root, tmp_path / "cache")


def test_only_one_image_set(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "o")
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="has images_background but not images_evaluation"):
        load_small(root, tmp_path / "cache")


def test_truncated_archive(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "o")
    archive = root / "images_background.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_background\.zip is not a valid zip archive.*truncated"):
        load_small(root, tmp_path / "cache")


def test_html_page_saved_as_archive(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "o")
    (root / "images_evaluation.zip").write_text("<!DOCTYPE html><html><body>Not Found</body></html>")
    with pytest.raises(DataError, match=r"images_evaluation\.zip is an HTML page"):
        load_small(root, tmp_path / "cache")


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    name = "images_evaluation/Tengwar/character01/0009_03.png"
    root = write_omniglot_zips(tmp_path / "o", skip={name},
                               extra={"images_evaluation": {name: b"\x89PNG garbage"}})
    with pytest.raises(DataError, match=r"cannot decode .*0009_03\.png"):
        load_small(root, tmp_path / "cache")


def test_corrupt_bytes_inside_archive(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "o")
    archive = root / "images_background.zip"
    data = bytearray(archive.read_bytes())
    start = data.index(b"IDAT")  # flip bytes inside the first PNG's pixel data: a CRC error
    data[start + 8:start + 40] = bytes(32)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt"):
        load_small(root, tmp_path / "cache")


@pytest.mark.parametrize(
    "entry",
    ["../evil.png", "images_background/../../evil.png", "/tmp/evil.png",
     "images_background\\..\\..\\evil.png"],
)
def test_zip_slip_entries_are_refused(tmp_path: Path, entry: str) -> None:
    root = write_omniglot_zips(tmp_path / "o", extra={"images_background": {entry: drawing_png(1, 1)}})
    with pytest.raises(DataError, match="unsafe entry"):
        load_small(root, tmp_path / "cache")
    assert not (tmp_path / "evil.png").exists()


def test_unexpected_layout(tmp_path: Path) -> None:
    root = write_omniglot_zips(tmp_path / "o",
                               extra={"images_background": {"images_background/Latin/x.png": b""}})
    with pytest.raises(DataError, match=r"unexpected entry .*Latin/x\.png.*<Alphabet>/characterNN"):
        load_small(root, tmp_path / "cache")


def test_nested_extraction_is_a_layout_error(tmp_path: Path) -> None:
    write_omniglot_folders(tmp_path / "o" / "images_background")  # unzipped into a folder of the same name
    with pytest.raises(DataError, match="unexpected entry"):
        load_small(tmp_path / "o", tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_without_decoding(small_omniglot: Path, tmp_path: Path, monkeypatch) -> None:
    first, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 1
    monkeypatch.setattr(omniglot, "_decode", lambda *a: pytest.fail("decoded although cached"))
    second, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert torch.equal(first, second)


def test_corrupt_cache_is_rebuilt_with_a_warning(small_omniglot: Path, tmp_path: Path, caplog) -> None:
    first, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("omniglot-*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        second, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert "rebuilding" in caplog.text
    assert torch.equal(first, second)
    assert torch.load(cache, weights_only=True)["images"].shape == first.shape  # rewritten whole


def test_cache_with_wrong_contents_is_rebuilt(small_omniglot: Path, tmp_path: Path, caplog) -> None:
    load_small(small_omniglot / "omniglot", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("omniglot-*.pt")
    payload = torch.load(cache, weights_only=True)
    payload["images"] = payload["images"][:3]
    torch.save(payload, cache)
    with caplog.at_level(logging.WARNING):
        images, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert images.shape[0] == 10 and "rebuilding" in caplog.text


def test_stale_cache_is_rebuilt_in_place(small_omniglot: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    root = small_omniglot / "omniglot"
    load_small(root, tmp_path / "cache")
    archive = root / "images_background.zip"
    os.utime(archive, ns=(time.time_ns(), archive.stat().st_mtime_ns + 10**9))  # the source changed
    decoded = []
    monkeypatch.setattr(omniglot, "_decode", lambda *a, real=omniglot._decode: decoded.append(1) or real(*a))
    with caplog.at_level(logging.WARNING):
        load_small(root, tmp_path / "cache")
    assert decoded and "is stale" in caplog.text
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 1  # overwritten, not piled up


def test_unwritable_cache_folder_only_warns(small_omniglot: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        images, _ = load_small(small_omniglot / "omniglot", blocker)
    assert images.shape[0] == 10 and "could not write the cache" in caplog.text


def test_nothing_is_written_to_the_data_folder(small_omniglot: Path, tmp_path: Path) -> None:
    root = small_omniglot / "omniglot"
    before = sorted(p.name for p in root.iterdir())
    load_small(root, tmp_path / "cache")
    assert (sorted(p.name for p in root.iterdir()) == before
            == ["images_background.zip", "images_evaluation.zip"])


# ---------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize(("scheme", "sizes"),
                         [("maml", (1100, 100, 423)), ("vinyals", (1028, 172, 423)),
                          ("shuffled", (1100, 100, 423))])
def test_split_sizes_disjoint_and_complete(scheme: str, sizes: tuple[int, int, int]) -> None:
    splits = omniglot.split_classes(real_class_names(), scheme)
    assert tuple(len(splits[s]) for s in ("train", "validation", "test")) == sizes
    union = set(splits["train"]) | set(splits["validation"]) | set(splits["test"])
    assert len(union) == 1623 == sum(sizes)
    assert splits == omniglot.split_classes(real_class_names(), scheme)  # deterministic


def test_maml_split_boundaries() -> None:
    splits = omniglot.split_classes(real_class_names(), "maml")
    assert splits["train"] == list(range(1100))
    assert splits["validation"] == list(range(1100, 1200))
    assert splits["test"] == list(range(1200, 1623))


def test_shuffled_split_mixes_the_alphabets_as_mamls_code_does() -> None:
    names = real_class_names()
    splits = omniglot.split_classes(names, "shuffled")
    assert all(s == sorted(s) for s in splits.values())
    # the fixed permutation, pinned: a change would silently make published runs another experiment
    assert splits["test"][:3] == [15, 20, 21] and splits["validation"][:3] == [4, 7, 18]
    assert names[15] == "Alphabet_of_the_Magi/character16"
    alphabets = {split: {names[i].split("/")[0] for i in classes} for split, classes in splits.items()}
    # unlike "maml" (test = 13 alphabets of images_evaluation, none seen in training), every test
    # alphabet here also has characters in training, and the test mixes both archives
    assert alphabets["test"] <= alphabets["train"] and len(alphabets["test"]) > 40
    maml = omniglot.split_classes(names, "maml")
    maml_alphabets = {split: {names[i].split("/")[0] for i in classes} for split, classes in maml.items()}
    assert len(maml_alphabets["test"]) == 13 and not maml_alphabets["test"] & maml_alphabets["train"]
    assert set(splits["test"]) != set(maml["test"])


def test_vinyals_split_matches_the_published_lists() -> None:
    names = real_class_names()
    splits = omniglot.split_classes(names, "vinyals")
    validation = {names[i].split("/")[0] for i in splits["validation"]}
    assert validation == {"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    assert (names[splits["test"][0]] == "Gurmukhi/character42"
            and names[splits["test"][-1]] == "ULOG/character26")
    assert names[max(splits["train"])] == "Gurmukhi/character41"
    assert {names[i].split("/")[0] for i in splits["test"]} == {
        "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
        "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
    }


def test_rotations_make_four_classes_per_character() -> None:
    images = torch.arange(2 * 3 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 1, 4, 4)
    rotated, names = omniglot.rotate(images, ["A/character01", "B/character01"])
    assert rotated.shape == (8, 3, 1, 4, 4)
    assert names[:4] == [f"A/character01/rot{d}" for d in ("000", "090", "180", "270")]
    assert torch.equal(rotated[0], images[0])
    assert torch.equal(rotated[5], torch.rot90(images[1], 1, dims=(-2, -1)))  # counter-clockwise
    assert torch.equal(rotated[2], images[0].flip(-1).flip(-2))


def test_load_dataset_end_to_end(small_omniglot: Path, small_counts, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    train = load_dataset("omniglot", "train", data_dir=small_omniglot, cache_dir=cache, download=False)
    assert (train.name, train.split, train.images.shape) == ("omniglot", "train", (24, 20, 1, 28, 28))
    test = load_dataset("omniglot", "test", data_dir=small_omniglot, cache_dir=cache, rotations=False,
                        split_scheme="maml")
    assert test.images.shape == (2, 20, 1, 28, 28)
    assert test.class_names == ["Tengwar/character01", "Tengwar/character02"]  # the last two in sorted order
    shuffled = load_dataset("omniglot", "test", data_dir=small_omniglot, cache_dir=cache, rotations=False)
    assert shuffled.images.shape == (2, 20, 1, 28, 28) and shuffled.class_names != test.class_names
    info = dataset_info("omniglot", data_dir=small_omniglot, cache_dir=cache)
    assert info["splits"] == {"train": {"classes": 6, "images_per_class": 20},
                              "validation": {"classes": 2, "images_per_class": 20},
                              "test": {"classes": 2, "images_per_class": 20}}
    assert info["image_shape"] == [1, 28, 28] and info["cached"] is True


# ---------------------------------------------------------------------------------------------- real data

_real = REAL_DATA_DIR
needs_real = pytest.mark.skipif(
    _real is None, reason="real Omniglot not found: set METAGRAD_DATA or provide ../shared/data/omniglot"
)


@pytest.fixture(scope="session")
def real_omniglot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """The real data folder and a cache built once per test session (and how long the build took)."""
    assert _real is not None
    cache = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    omniglot.load_images(omniglot.find_root(_real), cache)
    return _real, cache, time.perf_counter() - start


@needs_real
def test_real_omniglot_counts_and_splits(real_omniglot) -> None:
    data_dir, cache, _ = real_omniglot
    info = dataset_info("omniglot", data_dir=data_dir, cache_dir=cache)
    assert info["dataset"] == "omniglot" and info["image_shape"] == [1, 28, 28]
    assert ({s: v["classes"] for s, v in info["splits"].items()}
            == {"train": 1100, "validation": 100, "test": 423})
    assert all(v["images_per_class"] == 20 for v in info["splits"].values())
    vinyals = dataset_info("omniglot", data_dir=data_dir, cache_dir=cache, split_scheme="vinyals")
    assert [v["classes"] for v in vinyals["splits"].values()] == [1028, 172, 423]
    images, names = omniglot.load_images(omniglot.find_root(data_dir), cache)
    assert images.shape == (1623, 20, 1, 28, 28) and names == real_class_names()


@needs_real
def test_real_omniglot_sampled_task(real_omniglot) -> None:
    data_dir, cache, _ = real_omniglot
    start = time.perf_counter()
    splits = {s: load_dataset("omniglot", s, data_dir=data_dir, cache_dir=cache, download=False)
              for s in ("train", "validation", "test")}
    assert time.perf_counter() - start < 15  # cached: no decoding
    assert [d.num_classes for d in splits.values()] == [4400, 400, 1692]
    episode = EpisodeSampler(splits["test"], 20, 1, 5).sample(4, torch.Generator().manual_seed(0))
    assert episode.support_x.shape == (4, 20, 1, 28, 28) and episode.query_x.shape == (4, 100, 1, 28, 28)
    assert episode.support_x.min() == 0 and episode.support_x.max() == 1
    assert 0.02 < episode.query_x.mean() < 0.3  # ink = 1 on a background of 0: mostly background


@needs_real
def test_real_omniglot_pixels_match_learn2learn(real_omniglot) -> None:
    data_dir, cache, _ = real_omniglot
    root = omniglot.find_root(data_dir)
    images, names = omniglot.load_images(root, cache)
    with zipfile.ZipFile(root / "images_evaluation.zip") as zf:
        entry = max(n for n in zf.namelist() if n.startswith("images_evaluation/ULOG/character26/"))
        expected = reference_pixels(zf.read(entry))
    assert names[-1] == "ULOG/character26"
    np.testing.assert_array_equal(images[-1, -1, 0].numpy(), expected)


# ------------------------------------------------------------------------------------- hostile input


def _flip_byte_inside(path: Path, content: bytes) -> None:
    """Flip one bit in the middle of ``content`` where it is stored in ``path`` (the file stays loadable)."""
    data = bytearray(path.read_bytes())
    at = data.index(content) + len(content) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_zip_bomb_member_is_refused_before_inflating(tmp_path: Path, monkeypatch) -> None:
    name = "images_background/Braille/character01/0001_01.png"
    bomb = bytes(_io.MAX_IMAGE_BYTES + 1)  # zeros: a few hundred KB once deflated
    root = write_omniglot_zips(tmp_path / "o", skip={name}, extra={"images_background": {name: bomb}},
                               compression=zipfile.ZIP_DEFLATED)
    assert (root / "images_background.zip").stat().st_size < 2 << 20
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: pytest.fail("a member was inflated"))
    with pytest.raises(DataError, match=r"background\.zip: .*0001_01\.png is 67,108,865 bytes.*zip bomb"):
        load_small(root, tmp_path / "cache")


def test_member_larger_than_it_declares_is_corrupt(tmp_path: Path) -> None:
    name = "images_background/Braille/character01/0001_01.png"
    root = write_omniglot_zips(tmp_path / "o", skip={name},
                               extra={"images_background": {name: bytes(1 << 20)}},
                               compression=zipfile.ZIP_DEFLATED)
    archive = root / "images_background.zip"
    data = bytearray(archive.read_bytes())
    # Declare 100 bytes for 1 MiB: the size field of the local header and of the central directory entry.
    at = data.find(name.encode())
    while at != -1:
        if data[at - 30:at - 26] == b"PK\x03\x04":
            data[at - 30 + 22:at - 30 + 26] = (100).to_bytes(4, "little")
        elif data[at - 46:at - 42] == b"PK\x01\x02":
            data[at - 46 + 24:at - 46 + 28] = (100).to_bytes(4, "little")
        at = data.find(name.encode(), at + 1)
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"0001_01\.png.*corrupt"):
        load_small(root, tmp_path / "cache")


@pytest.mark.parametrize("side", [8000, 15000])  # above metagrad's pixel limit; above PIL's own
def test_png_bomb_in_an_extracted_folder_is_named(tmp_path: Path, side: int) -> None:
    root = write_omniglot_folders(tmp_path / "o" / "omniglot")
    bomb = root / "images_evaluation/Tengwar/character01/0009_03.png"
    Image.new("1", (side, side), color=1).save(bomb)  # a few KB that decode to side * side pixels
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DataError, match=rf"0009_03\.png has {side * side:,} pixels, more than 40,000,000"):
        load_small(root, tmp_path / "cache")


def test_flipped_byte_in_the_cache_is_rebuilt(small_omniglot: Path, tmp_path: Path, caplog) -> None:
    first, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("omniglot-*.pt")
    _flip_byte_inside(cache, first.numpy().tobytes()[:4096])
    assert not torch.equal(torch.load(cache, weights_only=True)["images"], first)  # torch loads it silently
    with caplog.at_level(logging.WARNING):
        second, _ = load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert "does not match its checksum" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(first, second)
    assert torch.equal(torch.load(cache, weights_only=True)["images"], first)  # rewritten


def test_cache_without_a_checksum_is_rebuilt_once(small_omniglot: Path, tmp_path: Path, caplog) -> None:
    load_small(small_omniglot / "omniglot", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("omniglot-*.pt")
    payload = torch.load(cache, weights_only=True)
    del payload["checksum"]  # as an older metagrad wrote it
    torch.save(payload, cache)
    with caplog.at_level(logging.WARNING):
        load_small(small_omniglot / "omniglot", tmp_path / "cache")
    assert "has no checksum" in caplog.text
    assert "checksum" in torch.load(cache, weights_only=True)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_drawing_that_is_no_regular_file_is_not_read(tmp_path: Path, kind: str) -> None:
    root = write_omniglot_folders(tmp_path / "o" / "omniglot")
    drawing = root / "images_evaluation/Tengwar/character01/0009_03.png"
    drawing.unlink()
    if kind == "fifo":
        os.mkfifo(drawing)  # reading it would block forever
    else:
        drawing.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(DataError, match=r"0009_03\.png is not a regular file"):
        load_small(root, tmp_path / "cache")
