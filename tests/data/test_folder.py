"""A user's own dataset, one folder per class: layout, decoding, caching, every error, and training on it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metagrad.compat.learn2learn as l2l
from metagrad import cli
from metagrad.data import folder as folder_module
from metagrad.data.datasets import dataset_info, download, load_dataset
from metagrad.errors import ConfigError, DataError


def _write_dataset(root: Path, classes: dict[str, int], *, gray: bool = False,
                   formats: tuple[str, ...] = ("png", "jpeg")) -> Path:
    """``root/<split>/<class>/<i>.<fmt>``: image (class c, index i) has a top-left pixel 10 * c + i
    (RGB: (10 * c + i, 10 * c + i, 200))."""
    for split in ("train", "validation", "test"):
        for c, (name, count) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                size = (40 + 3 * i, 30 + 5 * c)  # assorted sizes, as photos come
                pixels = np.full((size[1], size[0], 1 if gray else 3), 10 * c + i, dtype=np.uint8)
                if not gray:
                    pixels[..., 2] = 200  # a colour: R = G = B would be a grayscale picture
                image = Image.fromarray(pixels[..., 0] if gray else pixels, "L" if gray else "RGB")
                image.save(root / split / name / f"{i:02d}.{formats[i % len(formats)]}")
    return root


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("METAGRAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_rgb_and_grayscale_folders_decode_once(tmp_path: Path, cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write_dataset(tmp_path / "data" / "birds", {"sparrow": 4, "robin": 4, "owl": 4})
    train = load_dataset("folder", "train", data_dir=tmp_path / "data", folder="birds")
    assert train.images.shape == (3, 4, 3, 84, 84) and train.images.dtype == torch.uint8
    assert train.class_names == ["owl", "robin", "sparrow"]  # sorted folder names
    assert train.images[1, 2, :, 0, 0].tolist() == [12, 12, 200]  # robin (class 1 as written), image 2

    monkeypatch.setattr(folder_module, "_decode", lambda *_: pytest.fail("decoded again"))
    again = load_dataset("folder", "train", data_dir=tmp_path / "data", folder="birds")
    assert torch.equal(again.images, train.images)  # from the cache
    monkeypatch.undo()
    monkeypatch.setenv("METAGRAD_CACHE", str(cache))

    _write_dataset(tmp_path / "data" / "glyphs", {"a": 3, "b": 3}, gray=True)
    glyphs = load_dataset("folder", "test", data_dir=tmp_path / "data", folder="glyphs")
    assert glyphs.images.shape == (2, 3, 1, 28, 28)
    info = dataset_info("folder", data_dir=tmp_path / "data", folder="glyphs")
    assert info["image_shape"] == [1, 28, 28] and info["splits"]["validation"] == {"classes": 2,
                                                                                   "images_per_class": 3}


def test_unequal_classes_keep_all_their_images(tmp_path: Path, cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write_dataset(tmp_path / "data" / "mixed", {"a": 5, "b": 3, "c": 4}, formats=("png",))  # exact pixels
    split = load_dataset("folder", "train", data_dir=tmp_path / "data", folder="mixed")
    assert split.class_sizes == (5, 3, 4) and split.images.shape == (12, 3, 84, 84)
    assert split.images[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 23]  # 10 * c + i
    monkeypatch.setattr(folder_module, "_decode", lambda *_: pytest.fail("decoded again"))
    again = load_dataset("folder", "train", data_dir=tmp_path / "data", folder="mixed")
    assert again.class_sizes == (5, 3, 4) and torch.equal(again.images, split.images)  # from the cache
    monkeypatch.undo()
    info = dataset_info("folder", data_dir=tmp_path / "data", folder="mixed")
    assert info["splits"]["test"] == {"classes": 3, "images": 12, "min_images_per_class": 3,
                                      "max_images_per_class": 5}


def test_errors_name_the_problem_and_the_fix(tmp_path: Path, cache: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(DataError, match=r"dataset folder .*nothing does not exist\. Put your images there"):
        load_dataset("folder", "train", data_dir=data, folder="nothing")
    (data / "partial" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="has no validation, test folder"):
        load_dataset("folder", "train", data_dir=data, folder="partial")
    with pytest.raises(ConfigError, match="needs option.s. folder"):
        load_dataset("folder", "train", data_dir=data)
    with pytest.raises(ConfigError, match="must be the name of one folder"):
        load_dataset("folder", "train", data_dir=data, folder="../elsewhere")
    with pytest.raises(DataError, match="your own data"):
        download("folder", data_dir=data)

    _write_dataset(data / "one", {"only": 3})
    with pytest.raises(DataError, match="has 1 class folder.s.; a few-shot split needs at least 2"):
        load_dataset("folder", "train", data_dir=data, folder="one")
    _write_dataset(data / "thin", {"a": 3, "b": 1})
    with pytest.raises(DataError, match=r"class folder .*thin/train/b has 1 image.s.; each class needs at"):
        load_dataset("folder", "train", data_dir=data, folder="thin")
    _write_dataset(data / "broken", {"a": 2, "b": 2})
    (data / "broken" / "validation" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"cannot decode .*broken/validation/b/notes\.txt: not an image"):
        load_dataset("folder", "train", data_dir=data, folder="broken")


def test_train_on_a_folder_from_a_config_file(tmp_path: Path, cache: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    _write_dataset(tmp_path / "data" / "birds", {f"species{i}": 4 for i in range(4)}, gray=True)
    config = tmp_path / "birds.toml"
    config.write_text('preset = "omniglot-maml-5w1s"\n[data]\ndataset = "folder"\nfolder = "birds"\n'
                      'split_scheme = "folders"\nrotations = false\nways = 3\nshots = 1\nquery_shots = 2\n'
                      '[model]\nhidden_size = 8\n[meta]\niterations = 2\nmeta_batch_size = 2\n'
                      '[run]\neval_every = 1\neval_tasks = 2\ntest_tasks = 4\n')
    code = cli.main(["train", "--config", str(config), "--data-dir", str(tmp_path / "data"),
                     "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["dataset"] == "folder" and saved["data"]["folder"] == "birds"

    code = cli.main(["train", "--set", "data.folder=birds", "--device", "cpu",
                     "--run-dir", str(tmp_path / "x")])
    assert code == 2
    assert 'data.folder names your dataset\'s folder and goes with data.dataset = "folder"' in \
        capsys.readouterr().err


def test_learn2learn_meta_dataset_over_a_folder(tmp_path: Path, cache: Path) -> None:
    _write_dataset(tmp_path / "data" / "birds", {"a": 3, "b": 3, "c": 3})
    birds = load_dataset("folder", "train", data_dir=tmp_path / "data", folder="birds")
    dataset = l2l.data.MetaDataset(birds)
    transforms = l2l.data.transforms
    tasks = l2l.data.Taskset(dataset, [transforms.NWays(dataset, 2), transforms.KShots(dataset, 2),
                                       transforms.LoadData(dataset), transforms.RemapLabels(dataset)])
    data, labels = tasks.sample()
    assert data.shape == (4, 3, 84, 84) and sorted(labels.tolist()) == [0, 0, 1, 1]


def test_a_dataset_is_colour_when_an_image_shows_colour_whatever_the_modes(
        tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The mixed-folder rule: 1x28x28 unless some image shows colour; a grayscale picture saved as RGB
    # (or as a palette) does not count, one colour picture among grayscale ones is named in a warning.
    data = tmp_path / "data"
    _write_dataset(data / "glyphs", {"a": 3, "b": 3}, gray=True, formats=("png",))
    pixels = np.full((20, 20, 3), 77, np.uint8)
    Image.fromarray(pixels, "RGB").save(data / "glyphs" / "test" / "a" / "00.png")
    Image.fromarray(pixels[..., 0], "L").convert("P").save(data / "glyphs" / "train" / "b" / "01.png")
    with caplog.at_level(logging.WARNING):
        gray = load_dataset("folder", "test", data_dir=data, folder="glyphs")
    assert gray.images.shape == (2, 3, 1, 28, 28) and "colour" not in caplog.text
    assert (gray.images[0, 0] == 77).all()  # test/a/00.png
    pixels[0, 0] = (255, 0, 0)
    Image.fromarray(pixels, "RGB").save(data / "glyphs" / "validation" / "b" / "02.png")
    with caplog.at_level(logging.WARNING):
        colour = load_dataset("folder", "test", data_dir=data, folder="glyphs")
    assert colour.images.shape == (2, 3, 3, 84, 84)
    assert torch.equal(colour.images[:, :, 0], colour.images[:, :, 2])  # grayscale in every channel
    assert "validation/b/02.png shows colour" in caplog.text
    assert "3 of its 18 images are in colour modes" in caplog.text


@pytest.mark.parametrize("name", [b"caf\xe9", "naïve".encode(), b"two\nlines", b"tab\there"])
def test_any_folder_name_the_file_system_allows_is_a_class_name(tmp_path: Path, cache: Path,
                                                                 name: bytes) -> None:
    data = tmp_path / "data"
    _write_dataset(data / "names", {"plain": 2, "other": 2}, gray=True)
    for split in ("train", "validation", "test"):
        (data / "names" / split / "other").rename(data / "names" / split / os.fsdecode(name))
    train = load_dataset("folder", "train", data_dir=data, folder="names")
    shown = name.decode("utf-8", "backslashreplace")
    assert sorted(train.class_names) == sorted(["plain", shown])
    assert all(n.encode("utf-8") for n in train.class_names)  # valid text: logs, JSON and caches take it
    again = load_dataset("folder", "train", data_dir=data, folder="names")  # the cache holds the names
    assert again.class_names == train.class_names


def test_images_above_the_limits_are_refused_before_any_decoding(tmp_path: Path, cache: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from test_io import png_header

    data = tmp_path / "data"
    _write_dataset(data / "bombs", {"a": 2, "b": 2}, gray=True)
    (data / "bombs" / "test" / "b" / "big.png").write_bytes(png_header(13_000, 13_000))
    monkeypatch.setattr(folder_module, "_decode", lambda *_: pytest.fail("decoded before the check"))
    with pytest.raises(DataError, match=r"test/b/big\.png has 169,000,000 pixels, more than 40,000,000"):
        load_dataset("folder", "train", data_dir=data, folder="bombs")
    (data / "bombs" / "test" / "b" / "big.png").unlink()
    os.mkfifo(data / "bombs" / "test" / "b" / "fifo.png")
    with pytest.raises(DataError, match=r"fifo\.png is not a regular file"):
        load_dataset("folder", "train", data_dir=data, folder="bombs")
    (data / "bombs" / "test" / "b" / "fifo.png").unlink()
    (data / "bombs" / "test" / "b" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(DataError, match=r"gone\.png is a symbolic link to nothing"):
        load_dataset("folder", "train", data_dir=data, folder="bombs")
