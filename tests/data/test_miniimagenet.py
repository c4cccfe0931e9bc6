"""Mini-ImageNet readers: learn2learn pickles (restricted unpickling) and CSV + JPEG folders."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import (
    SMALL_MINI_COUNTS,
    mini_classes,
    mini_image,
    mini_pickle_payload,
    write_mini_csv,
    write_mini_pickle,
)
from PIL import Image

from metagrad.data import dataset_info, download, load_dataset, miniimagenet
from metagrad.errors import DataError


def load_small(root: Path, split: str, cache_dir: Path):
    return miniimagenet.load_split(root, split, cache_dir, counts=SMALL_MINI_COUNTS)


# ---------------------------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_loads_sorted_classes_channels_first(tmp_path: Path, protocol: int) -> None:
    write_mini_pickle(tmp_path, "train", protocol=protocol)
    images, names = load_small(tmp_path, "train", tmp_path / "cache")
    assert images.shape == (4, 6, 3, 84, 84) and images.dtype == torch.uint8
    assert names == sorted(mini_classes("train"))
    labels = {name: label for label, name in enumerate(mini_classes("train"))}
    for c, name in enumerate(names):
        for i in range(6):
            expected = torch.from_numpy(mini_image(labels[name], i)).permute(2, 0, 1)  # HWC -> CHW
            assert torch.equal(images[c, i], expected)
    assert not list(tmp_path.glob("cache/*"))  # already decoded: no second cache


def test_numpy_scalars_and_arrays_as_indices(tmp_path: Path) -> None:
    payload = mini_pickle_payload("train")
    names = list(payload["class_dict"])
    payload["class_dict"][names[0]] = [np.int64(i) for i in payload["class_dict"][names[0]]]
    payload["class_dict"][names[1]] = np.asarray(payload["class_dict"][names[1]], dtype=np.int32)
    write_mini_pickle(tmp_path, "train", payload, protocol=2)
    images, _ = load_small(tmp_path, "train", tmp_path / "cache")
    assert images.shape == (4, 6, 3, 84, 84)


def test_numpy1_pickles_are_accepted(tmp_path: Path) -> None:
    """numpy < 2 writes ``numpy.core.multiarray``; numpy >= 2 writes ``numpy._core.multiarray``."""
    data = pickle.dumps(mini_pickle_payload("train"), protocol=2)  # protocol 2 names globals as text lines
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    (tmp_path / miniimagenet.PICKLE_NAMES["train"]).write_bytes(data)
    images, _ = load_small(tmp_path, "train", tmp_path / "cache")
    assert images.shape == (4, 6, 3, 84, 84)


class _RunsCode:
    """Unpickling this calls os.system: exactly what a restricted unpickler must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "inside_class_dict"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = mini_pickle_payload("train")
    if where == "top":
        payload = _RunsCode(marker)
    else:
        payload["class_dict"][next(iter(payload["class_dict"]))].append(_RunsCode(marker))
    write_mini_pickle(tmp_path, "train", payload)
    with pytest.raises(DataError, match=r"pickled '(posix|os)\.system'.*refusing"):
        load_small(tmp_path, "train", tmp_path / "cache")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [pickle.dumps(eval), pickle.dumps(Path("x")), pickle.dumps(np.load)])
def test_other_globals_are_refused(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / miniimagenet.PICKLE_NAMES["test"]).write_bytes(payload)
    with pytest.raises(DataError, match="refusing to load it"):
        load_small(tmp_path, "test", tmp_path / "cache")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"<!DOCTYPE html><html><head><title>Google Drive</title>", "is an HTML page"),
        (b"  <html>Virus scan warning</html>", "is an HTML page"),
        (b"not a pickle at all", "not a readable pickle"),
    ],
)
def test_html_empty_or_garbage_pickle(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / miniimagenet.PICKLE_NAMES["validation"]).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_small(tmp_path, "validation", tmp_path / "cache")


def test_truncated_pickle(tmp_path: Path) -> None:
    path = write_mini_pickle(tmp_path, "train")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_small(tmp_path, "train", tmp_path / "cache")


def _payload_with(**changes):
    payload = mini_pickle_payload("train")
    payload.update(changes)
    return payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], r"expected a dict with 'image_data'.*found list"),
        ({"images": np.zeros(3)}, r"found dict with keys \['images'\]"),
        (_payload_with(image_data=np.zeros((24, 84, 84, 3), np.float32)), "float32 with shape"),
        (_payload_with(image_data=np.zeros((24, 32, 32, 3), np.uint8)), r"\(24, 32, 32, 3\)"),
        (_payload_with(image_data=np.zeros((5, 84, 84, 3), np.uint8)),
         "refers to image 23 but 'image_data' has only 5"),
        (_payload_with(class_dict={"n1": "abc"}), "must map class names to lists of row indices"),
        (_payload_with(class_dict={f"n{i}": list(range(6 * i, 6 * i + 6)) for i in range(3)}),
         r"holds 3 classes; Mini-ImageNet's 'train' split has 4"),
        (_payload_with(class_dict={f"n{i}": list(range(6 * i, 6 * i + 5 + (i == 0))) for i in range(4)}),
         r"class n1 has 5 images, expected 6 \(2 more classes"),
    ],
)
def test_malformed_pickles(tmp_path: Path, payload, message: str) -> None:
    write_mini_pickle(tmp_path, "train", payload)
    with pytest.raises(DataError, match=message):
        load_small(tmp_path, "train", tmp_path / "cache")


def test_default_counts_want_the_real_split(tmp_path: Path) -> None:
    write_mini_pickle(tmp_path, "train")
    with pytest.raises(DataError, match="holds 4 classes; Mini-ImageNet's 'train' split has 64"):
        miniimagenet.load_split(tmp_path, "train", tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- CSV + JPEG


def test_csv_and_jpeg_folder(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "mini-imagenet"
    write_mini_csv(root, "validation")
    images, names = load_small(root, "validation", tmp_path / "cache")
    assert images.shape == (2, 6, 3, 84, 84) and images.dtype == torch.uint8
    assert names == sorted(mini_classes("validation"))
    # the first image of the first sorted class, resized as the reference scripts do
    first = root / "images" / f"{names[0]}{0:08d}.jpg"
    expected = np.asarray(Image.open(first).convert("RGB").resize((84, 84), Image.LANCZOS))
    np.testing.assert_array_equal(images[0, 0].permute(1, 2, 0).numpy(), expected)
    # decoded once: the second load comes from the cache
    monkeypatch.setattr(miniimagenet, "_decode_jpeg", lambda path: pytest.fail("decoded although cached"))
    again, _ = load_small(root, "validation", tmp_path / "cache")
    assert torch.equal(images, again)


def test_csv_cache_goes_stale_when_an_image_changes(tmp_path: Path, caplog) -> None:
    root = tmp_path / "m"
    write_mini_csv(root, "test")
    first, _ = load_small(root, "test", tmp_path / "cache")
    image = next((root / "images").iterdir())
    Image.new("RGB", (50, 50), (255, 0, 0)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING):
        second, _ = load_small(root, "test", tmp_path / "cache")
    assert not torch.equal(first, second) and "is stale" in caplog.text
    assert len(list((tmp_path / "cache").glob("mini-imagenet-test-*.pt"))) == 1


def test_corrupt_csv_cache_is_rebuilt(tmp_path: Path, caplog) -> None:
    root = tmp_path / "m"
    write_mini_csv(root, "test")
    first, _ = load_small(root, "test", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.pt")
    cache.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        second, _ = load_small(root, "test", tmp_path / "cache")
    assert torch.equal(first, second) and "rebuilding" in caplog.text


def test_pickle_wins_over_csv(tmp_path: Path) -> None:
    write_mini_csv(tmp_path, "train")
    write_mini_pickle(tmp_path, "train")
    assert miniimagenet.source_of(tmp_path, "train")[0] == "pickle"


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda root: next((root / "images").iterdir()).unlink(), "listed in val.csv but missing"),
        (lambda root: (root / "val.csv").write_text("file,class\na.jpg,n1\n"),
         "does not start with the header"),
        (lambda root: (root / "val.csv").write_text(""), "does not start with the header"),
        (lambda root: (root / "val.csv").write_text("<!DOCTYPE html>\n<html>"), "is an HTML page, not a CSV"),
        (lambda root: (root / "val.csv").write_text("filename,label\na.jpg\n"),
         "line 2: expected 'filename,label'"),
        (lambda root: (root / "val.csv").write_text("filename,label\n../../etc/passwd,n1\n"), "unsafe entry"),
        (lambda root: next((root / "images").iterdir()).write_bytes(b"\xff\xd8 not a jpeg"), "cannot decode"),
        (lambda root: [p.unlink() for p in (root / "images").iterdir()] and (root / "images").rmdir(),
         "does not exist"),
    ],
)
def test_broken_csv_formats(tmp_path: Path, break_it, message: str) -> None:
    root = tmp_path / "m"
    write_mini_csv(root, "validation")
    break_it(root)
    with pytest.raises(DataError, match=message):
        load_small(root, "validation", tmp_path / "cache")


def test_wrong_csv_counts(tmp_path: Path) -> None:
    root = tmp_path / "m"
    write_mini_csv(root, "train")
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="has 5 images, expected 6"):
        load_small(root, "train", tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- public API


def test_missing_split_names_both_formats_and_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no mini-imagenet-cache-test\.pkl or test\.csv in .*does not exist"
                                        r".*no stable official download"):
        load_dataset("mini-imagenet", "test", data_dir=tmp_path)


def test_load_dataset_and_info(tmp_path: Path, small_mini_counts) -> None:
    root = tmp_path / "mini-imagenet"
    for split in ("train", "validation"):
        write_mini_pickle(root, split)
    write_mini_csv(root, "test")
    dataset = load_dataset("mini-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert (dataset.name, dataset.split, dataset.image_shape) == ("mini-imagenet", "train", (3, 84, 84))
    assert load_dataset("mini-imagenet", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache",
                        split_scheme="ravi").num_classes == 3
    info = dataset_info("mini-imagenet", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert info["dataset"] == "mini-imagenet" and info["image_shape"] == [3, 84, 84]
    assert info["splits"] == {"train": {"classes": 4, "images_per_class": 6},
                              "validation": {"classes": 2, "images_per_class": 6},
                              "test": {"classes": 3, "images_per_class": 6}}


def test_no_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot be downloaded automatically.*mini-imagenet-cache"):
        download("mini-imagenet", data_dir=tmp_path)
