"""CIFAR-FS: learn2learn's cifar100.zip and its extracted folder, in metagrad's and learn2learn's places."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from data_builders import SMALL_CIFARFS_COUNTS, cifarfs_classes, cifarfs_files, write_cifarfs

from metagrad.data import cifarfs, dataset_info, download, load_dataset
from metagrad.errors import DataError

pytestmark = pytest.mark.usefixtures("small_benchmark_counts")


@pytest.mark.parametrize(("folder", "as_zip"), [("cifar-fs", True), ("cifar-fs", False), ("cifarfs", False)])
def test_reads_zip_and_folders_with_bertinetto_splits(tmp_path: Path, folder: str, as_zip: bool) -> None:
    write_cifarfs(tmp_path / "data" / folder, as_zip=as_zip)
    test = load_dataset("cifar-fs", "test", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert test.images.shape == (3, SMALL_CIFARFS_COUNTS.images, 3, 32, 32) and test.class_sizes is None
    assert test.class_names == sorted(cifarfs_classes("test"))
    # classes are numbered across the splits in sorted order as written: train 0-3, validation 4-5, test 6-8
    assert test.images[:, :, 0, 0, 0].tolist() == [[6 + c] * 5 for c in range(3)]
    assert test.images[2, :, 1, 0, 0].tolist() == list(range(5))  # images of a class by file name
    info = dataset_info("cifar-fs", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert info["splits"] == {"train": {"classes": 4, "images_per_class": 5},
                              "validation": {"classes": 2, "images_per_class": 5},
                              "test": {"classes": 3, "images_per_class": 5}}
    assert info["image_shape"] == [3, 32, 32]


def test_trees_without_their_top_folder(tmp_path: Path) -> None:
    files = cifarfs_files()
    (tmp_path / "a" / "cifar-fs").mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / "a" / "cifar-fs" / cifarfs.ARCHIVE, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"CIFAR-FS/{name}", data)  # another top folder
    for name, data in files.items():  # data/ and splits/ straight in the dataset folder
        path = tmp_path / "b" / "cifar-fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    a, b = (load_dataset("cifar-fs", "test", data_dir=tmp_path / d, cache_dir=tmp_path / "c") for d in "ab")
    assert torch.equal(a.images, b.images) and a.class_names == b.class_names


def test_decodes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifarfs(tmp_path / "cifar-fs", as_zip=True)
    first = load_dataset("cifar-fs", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(cifarfs, "_decode", lambda *_: pytest.fail("decoded again"))
    again = load_dataset("cifar-fs", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images)


def test_missing_data_says_where_to_get_it_and_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no cifar100.zip or cifar100/ in .*cifar-fs .*does not exist.*"
                                        r"zenodo.org/record/7978538"):
        load_dataset("cifar-fs", "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="cannot be downloaded automatically.*cifar100.zip"):
        download("cifar-fs", data_dir=tmp_path)


def _zip(tmp_path: Path, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    root = write_cifarfs(tmp_path / "cifar-fs", as_zip=True, files=files)
    if extra:
        with zipfile.ZipFile(root / cifarfs.ARCHIVE, "a") as zf:
            for name, data in extra.items():
                zf.writestr(name, data)
    return tmp_path


def test_damaged_copies_are_refused_with_the_file_named(tmp_path: Path) -> None:
    files = cifarfs_files()
    name = sorted(cifarfs_classes("train"))[1]
    short = {k: v for k, v in files.items() if not k.startswith(f"data/{name}/{name}_004")}
    with pytest.raises(DataError, match=f"class {name} has 4 images, expected 5.*incomplete"):
        load_dataset("cifar-fs", "train", data_dir=_zip(tmp_path / "a", short), cache_dir=tmp_path / "c")
    corrupt = {**files, f"data/{name}/{name}_002.png": b"\x89PNG\r\n\x1a\nnot really"}
    with pytest.raises(DataError, match=rf"cannot decode .*zip: cifar100/data/{name}/{name}_002.png"):
        load_dataset("cifar-fs", "train", data_dir=_zip(tmp_path / "b", corrupt), cache_dir=tmp_path / "c")
    no_list = {k: v for k, v in files.items() if not k.endswith("val.txt")}
    with pytest.raises(DataError, match=r"no splits/bertinetto/val.txt \(the class list"):
        load_dataset("cifar-fs", "validation", data_dir=_zip(tmp_path / "d", no_list),
                     cache_dir=tmp_path / "c")
    wrong = {**files, "splits/bertinetto/test.txt": b"class_70\nclass_71\n"}
    with pytest.raises(DataError, match="lists 2 classes; CIFAR-FS's 'test' split has 3"):
        load_dataset("cifar-fs", "test", data_dir=_zip(tmp_path / "e", wrong), cache_dir=tmp_path / "c")
    (tmp_path / "f" / "cifar-fs").mkdir(parents=True)
    (tmp_path / "f" / "cifar-fs" / cifarfs.ARCHIVE).write_bytes(b"<html>quota exceeded</html>")
    with pytest.raises(DataError, match="is not a readable zip"):
        load_dataset("cifar-fs", "test", data_dir=tmp_path / "f", cache_dir=tmp_path / "c")


def test_hostile_archives_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unsafe entry '../evil.png'"):
        load_dataset("cifar-fs", "train",
                     data_dir=_zip(tmp_path / "a", cifarfs_files(), {"../evil.png": b"x"}))
    files = cifarfs_files()
    name = min(cifarfs_classes("train"))
    big = {**files, f"data/{name}/{name}_000.png": bytes(65 << 20)}  # zeros: compress to nothing
    root = tmp_path / "b" / "cifar-fs"
    root.mkdir(parents=True)
    with zipfile.ZipFile(root / cifarfs.ARCHIVE, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, data in big.items():
            zf.writestr(f"cifar100/{key}", data)
    with pytest.raises(DataError, match="more than any image file should be.*zip bomb"):
        load_dataset("cifar-fs", "train", data_dir=tmp_path / "b", cache_dir=tmp_path / "c")
