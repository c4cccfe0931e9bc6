"""CUB-200-2011: the official .tgz or its folder, both class splits, ImageNet duplicates, the download."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from data_builders import cub_files, write_cub

from metagrad.data import _io, cub, dataset_info, download, load_dataset
from metagrad.errors import DataError

pytestmark = pytest.mark.usefixtures("small_benchmark_counts")

SMALL_TRIANTAFILLOU = {"validation": (2, 7), "test": (4,)}  # train: 1, 3, 5, 6, 8


@pytest.mark.parametrize(("folder", "as_tgz"), [("cub", True), ("cub", False), ("cubirds200", False)])
def test_reads_archive_and_folders_as_ragged_classes(tmp_path: Path, folder: str, as_tgz: bool) -> None:
    write_cub(tmp_path / "data" / folder, as_tgz=as_tgz)
    train = load_dataset("cub", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                         download=False)
    # Chen et al.: species 1, 3, 5, 7 train; 2, 6 validation; 4, 8 test. Species 5 has 5 photographs.
    assert train.class_names == ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet",
                                 "007.Parakeet_Auklet"]
    assert train.class_sizes == (4, 4, 5, 4) and train.images.shape == (17, 3, 84, 84)
    info = dataset_info("cub", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert info["splits"] == {
        "train": {"classes": 4, "images": 17, "min_images_per_class": 4, "max_images_per_class": 5},
        "validation": {"classes": 2, "images": 9, "min_images_per_class": 4, "max_images_per_class": 5},
        "test": {"classes": 2, "images_per_class": 4}}
    assert info["split_scheme"] == "chen"


def test_triantafillou_split_leaves_out_imagenet_duplicates(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cub, "TRIANTAFILLOU_SPLITS", SMALL_TRIANTAFILLOU)
    write_cub(tmp_path / "cub", as_tgz=True)
    kwargs = {"data_dir": tmp_path, "cache_dir": tmp_path / "cache", "download": False}
    train = load_dataset("cub", "train", split_scheme="triantafillou", **kwargs)
    assert [n[:3] for n in train.class_names] == ["001", "003", "005", "006", "008"]
    assert train.class_sizes == (3, 4, 5, 4, 4)  # species 1 without Black_Footed_Albatross_0002_55.jpg
    chen = load_dataset("cub", "train", split_scheme="chen", **kwargs)
    assert chen.class_sizes[0] == 4  # Chen et al. keep it
    # by file name the duplicate ("Black_Footed_...", capital F) comes first; the rest are the same
    assert torch.equal(chen.images[1:4], train.images[:3])
    assert cub.class_ids("all", "chen") == list(range(1, 9))  # the (small) copy's species


def test_official_split_sizes() -> None:
    def sizes(scheme):
        return [len(cub.class_ids(split, scheme, 200)) for split in ("train", "validation", "test")]

    assert sizes("chen") == [100, 50, 50] and sizes("triantafillou") == [140, 30, 30]
    for scheme in cub.SPLIT_SCHEMES:
        every = [n for s in ("train", "validation", "test") for n in cub.class_ids(s, scheme, 200)]
        assert sorted(every) == list(range(1, 201))
    assert len(cub.IMAGENET_DUPLICATES) == 43


def test_decodes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cub(tmp_path / "cub", as_tgz=True)
    kwargs = {"data_dir": tmp_path, "cache_dir": tmp_path / "cache", "download": False}
    first = load_dataset("cub", "test", **kwargs)
    monkeypatch.setattr(cub, "_decode_all", lambda *_: pytest.fail("decoded again"))
    assert torch.equal(load_dataset("cub", "validation", **kwargs).images[:1],
                       load_dataset("cub", "validation", **kwargs).images[:1])
    assert torch.equal(load_dataset("cub", "test", **kwargs).images, first.images)


def test_download_fetches_the_official_archive_and_checks_it(tmp_path: Path, monkeypatch) -> None:
    served = write_cub(tmp_path / "server", as_tgz=True) / cub.ARCHIVE
    body = served.read_bytes()
    monkeypatch.setattr(cub, "MD5", hashlib.md5(body).hexdigest())
    requested = []

    class Response(io.BytesIO):
        headers: ClassVar = {"Content-Length": str(len(body))}

    def urlopen(url: str, timeout: float) -> Response:
        requested.append(url)
        return Response(body)

    monkeypatch.setattr(_io.urllib.request, "urlopen", urlopen)
    assert download("cub", data_dir=tmp_path / "data") == tmp_path / "data" / "cub"
    assert requested == [cub.URL]
    test = load_dataset("cub", "test", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert test.num_classes == 2 and requested == [cub.URL]  # nothing fetched again
    monkeypatch.setattr(cub, "MD5", "0" * 32)
    with pytest.raises(DataError, match=r"has MD5 .* expected 0{32}.*nothing was saved.*data.caltech.edu"):
        download("cub", data_dir=tmp_path / "other")
    assert not (tmp_path / "other" / "cub").exists()


def test_missing_data_names_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no CUB_200_2011.tgz or CUB_200_2011/images/ in .*cub \(the folder "
                                        r"does not exist\).*data.caltech.edu/records/65de6-vp158"):
        load_dataset("cub", "train", data_dir=tmp_path, download=False)


def test_damaged_and_hostile_archives(tmp_path: Path) -> None:
    files = cub_files()
    short = dict(list(files.items())[:-1])
    write_cub(tmp_path / "a" / "cub", as_tgz=True, files=short)
    with pytest.raises(DataError, match="holds 8 species folders and 33 images; CUB-200-2011 has 8 .*34"):
        load_dataset("cub", "train", data_dir=tmp_path / "a", cache_dir=tmp_path / "c", download=False)
    root = write_cub(tmp_path / "b" / "cub", as_tgz=True)
    (root / cub.ARCHIVE).write_bytes((root / cub.ARCHIVE).read_bytes()[:-2000])
    with pytest.raises(DataError, match="is not a readable .tgz archive"):
        load_dataset("cub", "train", data_dir=tmp_path / "b", cache_dir=tmp_path / "c", download=False)
    name = next(iter(files))
    write_cub(tmp_path / "d" / "cub", as_tgz=True, files={**files, name: b"\xff\xd8 not a jpeg"})
    with pytest.raises(DataError, match=rf"cannot decode .*CUB_200_2011.tgz: CUB_200_2011/{name}"):
        load_dataset("cub", "train", data_dir=tmp_path / "d", cache_dir=tmp_path / "c", download=False)
    evil = tmp_path / "e" / "cub"
    evil.mkdir(parents=True)
    with tarfile.open(evil / cub.ARCHIVE, "w:gz") as tar:
        info = tarfile.TarInfo("../../outside.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match=r"unsafe entry '../../outside.jpg'"):
        load_dataset("cub", "train", data_dir=tmp_path / "e", cache_dir=tmp_path / "c", download=False)
    assert not (tmp_path / "outside.jpg").exists()
