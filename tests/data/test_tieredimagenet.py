"""tiered-ImageNet: Ren et al.'s PNG pickles read without unpickling, into a memory-mapped cache."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from data_builders import TIERED_SIZES, tiered_payloads, write_tiered

from metagrad.data import EpisodeSampler, _mapped, dataset_info, load_dataset, tieredimagenet
from metagrad.errors import DataError

pytestmark = pytest.mark.usefixtures("small_benchmark_counts")


@pytest.mark.parametrize(("protocol", "as_arrays"), [(2, True), (4, True), (5, True), (4, False), (2, False)])
def test_reads_each_pickle_protocol_into_ragged_classes(tmp_path: Path, protocol: int,
                                                        as_arrays: bool) -> None:
    write_tiered(tmp_path / "data" / "tiered-imagenet", protocol=protocol, as_arrays=as_arrays)
    train = load_dataset("tiered-imagenet", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert train.class_sizes == TIERED_SIZES["train"] and train.images.shape == (21, 3, 84, 84)
    assert train.class_names == ["n00000000", "n00000001", "n00000002"]  # label_specific_str
    # class after class, file order within a class: pixel (0, 0) holds (class, index)
    expected = [(c, i) for c, n in enumerate(TIERED_SIZES["train"]) for i in range(n)]
    assert train.images[:, :2, 0, 0].tolist() == [list(e) for e in expected]
    test = load_dataset("tiered-imagenet", "test", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert test.class_names == ["n00000448", "n00000449"] and test.class_sizes == TIERED_SIZES["test"]


def test_cache_is_memory_mapped_built_once_and_released_by_the_sampler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiered(tmp_path / "tiered-imagenet")
    first = load_dataset("tiered-imagenet", "validation", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert first.release_pages is not None
    monkeypatch.setattr(tieredimagenet, "_build", lambda *_: pytest.fail("decoded again"))
    again = load_dataset("tiered-imagenet", "validation", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, again.images)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".u8"]  # no leftovers
    released = []
    dataset = type(again)(again.name, again.split, again.images, again.class_names, again.class_sizes,
                          lambda: released.append(again.release_pages()))
    episode = EpisodeSampler(dataset, 2, 2, 2).sample(4, torch.Generator().manual_seed(0))
    assert released == [None] and episode.support_x.shape == (4, 4, 3, 84, 84)
    classes = torch.round(episode.support_x[:, :, 0, 0, 0] * 255)
    assert set(classes.flatten().tolist()) <= {0.0, 1.0}


def test_stale_or_truncated_cache_is_rebuilt(tmp_path: Path) -> None:
    root = write_tiered(tmp_path / "tiered-imagenet")
    load_dataset("tiered-imagenet", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    pixels = next((tmp_path / "cache").glob("*.u8"))
    with open(pixels, "r+b") as f:
        f.truncate(100)
    again = load_dataset("tiered-imagenet", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert again.images.shape == (13, 3, 84, 84)
    images, labels = tiered_payloads("test")
    (root / "test_images_png.pkl").write_bytes(pickle.dumps(images[::-1]))  # a changed source
    (root / "test_labels.pkl").write_bytes(pickle.dumps({**labels, "label_specific":
                                                         labels["label_specific"][::-1].copy()}))
    changed = load_dataset("tiered-imagenet", "test", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(changed.images[:, 0, 0, 0], again.images[:, 0, 0, 0])  # the same classes
    assert changed.images[:8, 1, 0, 0].tolist() == list(range(7, -1, -1))  # in the new file order


def test_interrupted_build_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiered(tmp_path / "tiered-imagenet")
    calls = []

    def decode_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = tieredimagenet._io.decode_image
    monkeypatch.setattr(tieredimagenet._io, "decode_image", decode_then_stop)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_info_reads_only_the_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiered(tmp_path / "tiered-imagenet")
    monkeypatch.setattr(tieredimagenet, "png_payloads", lambda *_: pytest.fail("read the images"))
    info = dataset_info("tiered-imagenet", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert info["splits"]["train"] == {"classes": 3, "images": 21, "min_images_per_class": 5,
                                       "max_images_per_class": 9}


def test_missing_files_say_where_they_come_from(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train_images_png.pkl or train_labels.pkl in .*tiered-imagenet "
                                        r"\(the folder does not exist\).*renmengye/few-shot-ssl-public"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_code_in_the_image_pickle_is_refused_and_never_run(tmp_path: Path, protocol: int) -> None:
    root = write_tiered(tmp_path / "tiered-imagenet")
    images, _ = tiered_payloads("train")
    (root / "train_images_png.pkl").write_bytes(pickle.dumps([*images[:2], _Evil()], protocol=protocol))
    with pytest.raises(DataError, match=r"train_images_png.pkl contains a pickled '(posix|os|nt).system'"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_code_in_the_label_pickle_is_refused(tmp_path: Path) -> None:
    root = write_tiered(tmp_path / "tiered-imagenet")
    (root / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": _Evil()}))
    with pytest.raises(DataError, match=r"val_labels.pkl contains a pickled"):
        load_dataset("tiered-imagenet", "validation", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_damaged_files(tmp_path: Path) -> None:
    root = write_tiered(tmp_path / "tiered-imagenet")
    images, labels = tiered_payloads("train")
    path = root / "train_images_png.pkl"
    path.write_bytes(pickle.dumps(images[:-1]))
    with pytest.raises(DataError, match="holds only 20 PNG images but train_labels.pkl labels 21"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    path.write_bytes(pickle.dumps(images)[:-3000])
    with pytest.raises(DataError, match="train_images_png.pkl is not a readable pickle"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    broken = np.frombuffer(b"\x89PNG\r\n\x1a\n" + bytes(40), dtype=np.uint8)
    path.write_bytes(pickle.dumps([*images[:5], broken, *images[6:]]))
    with pytest.raises(DataError, match=r"cannot decode .*train_images_png.pkl: image 5"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    path.write_bytes(pickle.dumps(images))
    two_classes = {**labels, "label_specific": labels["label_specific"] % 2}
    (root / "train_labels.pkl").write_bytes(pickle.dumps(two_classes))
    with pytest.raises(DataError, match="holds 2 classes; tiered-ImageNet's 'train' split has 3"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    (root / "train_labels.pkl").write_bytes(pickle.dumps({"labels": [1]}))
    with pytest.raises(DataError, match="not a tiered-ImageNet label file: expected a dict with 'label_spe"):
        load_dataset("tiered-imagenet", "train", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_released_pages_leave_the_resident_set(tmp_path: Path) -> None:
    shape = (64, 3, 84, 84)
    with _mapped.build_cache(tmp_path, "x", "k", shape, (64,), ["a"]) as put:
        for i in range(64):
            put(i, np.full(shape[1:], i, np.uint8))
    opened = _mapped.open_cache(tmp_path, "x", "k")
    file = tmp_path / "x.u8"
    assert int(opened.images[:30].sum()) > 0 and _resident_kb(file) >= 30 * 3 * 84 * 84 // 1024
    opened.release_pages()
    assert _resident_kb(file) == 0
    assert opened.images[5, 0, 0, 0] == 5  # still readable


def test_mapped_cache_refuses_a_description_that_does_not_match(tmp_path: Path) -> None:
    with _mapped.build_cache(tmp_path, "x", "k", (3, 1, 2, 2), (1, 2), ["a", "b"]) as put:
        for i in range(3):
            put(i, np.full((1, 2, 2), i, np.uint8))
    opened = _mapped.open_cache(tmp_path, "x", "k")
    assert opened is not None and opened.images[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert _mapped.open_cache(tmp_path, "x", "other") is None  # stale
    (tmp_path / "x.json").write_text("{not json")
    assert _mapped.open_cache(tmp_path, "x", "k") is None
