"""The dataset registry and its entry points: names, options, folders, downloads, atomic writes."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import pytest
import torch
from data_builders import write_omniglot_zips

from metagrad.data import (
    DATASETS,
    FewShotDataset,
    _io,
    dataset_info,
    download,
    load_dataset,
    omniglot,
    resolve_cache_dir,
    resolve_data_dir,
)
from metagrad.errors import ConfigError, DataError


def test_registry_names() -> None:
    assert list(DATASETS) == ["omniglot", "mini-imagenet", "cifar-fs", "fc100", "tiered-imagenet", "cub",
                              "folder"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: load_dataset("omniglott", "train"),
        lambda: dataset_info("cifar"),
        lambda: download("imagenet"),
    ],
)
def test_unknown_dataset_lists_valid_names(call) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset .*valid datasets: omniglot, mini-imagenet"):
        call()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "val"}, r"unknown split 'val' for omniglot; valid splits: train, validation, test"),
        ({"split_scheme": "random"},
         r"split_scheme='random' is not valid; choose one of 'maml', 'vinyals', 'shuffled'"),
        ({"rotations": "yes"}, r"rotations='yes' is not valid; choose one of True, False"),
        ({"rotations": 1}, r"rotations=1 is not valid"),
        ({"ways": 5}, r"dataset 'omniglot' has no option 'ways'; its options: split_scheme, rotations"),
    ],
)
def test_bad_split_or_option(tmp_path: Path, kwargs: dict, message: str) -> None:
    kwargs = {"split": "train", **kwargs}
    with pytest.raises(ConfigError, match=message):
        load_dataset("omniglot", data_dir=tmp_path, download=False, **kwargs)


def test_mini_imagenet_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no option 'rotations'"):
        load_dataset("mini-imagenet", "train", data_dir=tmp_path, rotations=True)
    with pytest.raises(ConfigError, match="split_scheme='maml' is not valid; choose one of 'ravi'"):
        dataset_info("mini-imagenet", data_dir=tmp_path, split_scheme="maml")


def test_resolve_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("METAGRAD_DATA", "METAGRAD_CACHE", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir() == tmp_path / ".local" / "share" / "metagrad"
    assert resolve_cache_dir() == tmp_path / ".cache" / "metagrad"
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg-cache")
    monkeypatch.setenv("XDG_DATA_HOME", "/xdg-data")
    assert resolve_cache_dir() == Path("/xdg-cache/metagrad")
    assert resolve_data_dir() == Path("/xdg-data/metagrad")
    monkeypatch.setenv("METAGRAD_CACHE", "/env-cache")
    monkeypatch.setenv("METAGRAD_DATA", "/env-data")
    assert resolve_cache_dir() == Path("/env-cache") and resolve_data_dir() == Path("/env-data")
    assert resolve_cache_dir("/arg") == Path("/arg") and resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir("~/d") == tmp_path / "d"


def test_missing_data_without_download_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError,
                       match=r"Omniglot not found: .*does not exist.*images_background\.zip.*--data-dir"):
        load_dataset("omniglot", "train", data_dir=tmp_path / "nothing-here", cache_dir=tmp_path,
                     download=False)
    with pytest.raises(DataError, match="Omniglot not found"):
        dataset_info("omniglot", data_dir=tmp_path)


def test_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, small_omniglot: Path, small_counts,
                                   tmp_path: Path) -> None:
    monkeypatch.setenv("METAGRAD_DATA", str(small_omniglot))
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "env-cache"))
    dataset = load_dataset("omniglot", "validation", download=False)
    assert dataset.num_classes == 8 and list((tmp_path / "env-cache").glob("omniglot-*.pt"))


# ---------------------------------------------------------------------------------------------- downloads


class _FakeResponse(io.BytesIO):
    """What urlopen returns: a readable body with headers; optionally dies part-way."""

    def __init__(self, body: bytes, fail_after: int | None = None) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}
        self._fail_after = fail_after

    def read(self, size: int = -1) -> bytes:
        if self._fail_after is not None and self.tell() >= self._fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(min(size, self._fail_after - self.tell()) if self._fail_after else size)


def _serve(monkeypatch: pytest.MonkeyPatch, bodies: dict[str, bytes],
           fail_after: int | None = None) -> list[str]:
    requested: list[str] = []

    def urlopen(url: str, timeout: float) -> _FakeResponse:
        requested.append(url)
        return _FakeResponse(bodies[url.rsplit("/", 1)[1]], fail_after)

    monkeypatch.setattr(_io.urllib.request, "urlopen", urlopen)
    return requested


@pytest.fixture
def official_zips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small zips standing in for the official archives, with their MD5s made "official"."""
    source = write_omniglot_zips(tmp_path / "server")
    bodies = {f"{n}.zip": (source / f"{n}.zip").read_bytes() for n in omniglot.IMAGE_SET_NAMES}
    monkeypatch.setattr(omniglot, "OFFICIAL_MD5", {n: hashlib.md5(bodies[f"{n}.zip"]).hexdigest()
                                                     for n in omniglot.IMAGE_SET_NAMES})
    return bodies


def test_download_fetches_verifies_and_renames(tmp_path, monkeypatch, official_zips, small_counts) -> None:
    requested = _serve(monkeypatch, official_zips)
    root = download("omniglot", data_dir=tmp_path / "data")
    assert root == tmp_path / "data" / "omniglot"
    assert requested == [omniglot.DOWNLOAD_URL.format(name=n) for n in omniglot.IMAGE_SET_NAMES]
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    # nothing refetched
    assert download("omniglot", data_dir=tmp_path / "data") == root and len(requested) == 2
    dataset = load_dataset("omniglot", "test", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert dataset.num_classes == 8


def test_load_dataset_downloads_only_what_is_missing(tmp_path, monkeypatch, official_zips,
                                                     small_counts) -> None:
    root = tmp_path / "data" / "omniglot"
    root.mkdir(parents=True)
    (root / "images_background.zip").write_bytes(official_zips["images_background.zip"])
    requested = _serve(monkeypatch, official_zips)
    load_dataset("omniglot", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert requested == [omniglot.DOWNLOAD_URL.format(name="images_evaluation")]


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch, official_zips) -> None:
    _serve(monkeypatch, {**official_zips, "images_background.zip": b"<html>rate limited</html>"})
    with pytest.raises(DataError, match=r"has MD5 .* expected .*nothing was saved.*put the two zip files"):
        download("omniglot", data_dir=tmp_path)
    assert not (tmp_path / "omniglot").exists()  # the folder it made for the download is gone too


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, official_zips) -> None:
    _serve(monkeypatch, official_zips, fail_after=1000)
    with pytest.raises(DataError, match="could not download .*connection reset"):
        download("omniglot", data_dir=tmp_path)
    assert not (tmp_path / "omniglot").exists()  # no half-written zip, no temporary file, no empty folder


def test_no_network_says_where_to_put_the_files(tmp_path, monkeypatch) -> None:
    def offline(url: str, timeout: float):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(_io.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as error:
        load_dataset("omniglot", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "could not download https://raw.githubusercontent.com/brendenlake/omniglot" in message
    assert ("name resolution" in message
            and f"put the two zip files (or their extracted folders) in {tmp_path}" in message)
    assert list(tmp_path.iterdir()) == []  # no empty dataset folder left to confuse the next command


def test_failed_second_download_keeps_the_first_archive(tmp_path, monkeypatch, official_zips) -> None:
    _serve(monkeypatch, {**official_zips, "images_evaluation.zip": b"<html>rate limited</html>"})
    with pytest.raises(DataError, match="has MD5"):
        download("omniglot", data_dir=tmp_path / "data")
    assert [p.name for p in (tmp_path / "data" / "omniglot").iterdir()] == ["images_background.zip"]


def test_unwritable_data_folder(tmp_path, monkeypatch, official_zips) -> None:
    _serve(monkeypatch, official_zips)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="could not save"):
        download("omniglot", data_dir=blocker)


# ---------------------------------------------------------------------------------------------- plumbing


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), _io.atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with _io.atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_cache_refuses_pickled_code(tmp_path: Path, caplog) -> None:
    """Cache files are read with weights_only=True: a pickle with code in it counts as corrupt."""
    path = tmp_path / "omniglot-x.pt"
    torch.save({"key": "k", "version": _io.CACHE_FORMAT_VERSION, "images": torch.zeros(1),
                "evil": Path("x")}, path)
    assert _io.load_cache(path, "k") is None and "unreadable" in caplog.text


def test_few_shot_dataset_shape_checks() -> None:
    with pytest.raises(ValueError, match="uint8"):
        FewShotDataset("x", "train", torch.zeros(2, 3, 1, 4, 4))
