"""Your own image folders from the command line: the folder's defaults, `data info folder`, a network
that follows the images, a shape mismatch as one message before any run file, and no half-made run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_run import TINY_OVERRIDES

from metagrad import cli
from metagrad.errors import ConfigError, TrainingError
from metagrad.models import MiniImagenetCNN, OmniglotCNN
from metagrad.training import config as config_module
from metagrad.training import loop, resolve_config, run, setup


def _folder(root: Path, name: str, mode: str) -> Path:
    """DATA/NAME/{train,validation,test}/CLASS/IMAGE: 6, 4 and 4 classes of 5 PNGs of 20x20 pixels."""
    rng = np.random.default_rng(0)
    for split, classes in (("train", 6), ("validation", 4), ("test", 4)):
        for c in range(classes):
            folder = root / name / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(5):
                shape = (20, 20) if mode == "L" else (20, 20, 3)
                Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(folder / f"{i}.png")
    return root


FOLDER_RUN = [*(f"--set={k}={v}" for k, v in TINY_OVERRIDES.items() if k not in ("run.device",)),
              "--device", "cpu", "-q"]


def test_a_folder_takes_its_own_split_and_no_rotations_from_any_preset() -> None:
    for preset in ("omniglot-maml-5w1s", "mini-imagenet-maml-5w1s"):
        config = resolve_config(preset=preset, overrides={"data.dataset": "folder", "data.folder": "birds"})
        assert (config.data.split_scheme, config.data.rotations) == ("folders", False)
    # what the user sets is kept (and checked)
    with pytest.raises(ConfigError, match="rotations applies to omniglot only"):
        resolve_config(overrides={"data.dataset": "folder", "data.folder": "b", "data.rotations": True})
    assert set(config_module.DATASET_DEFAULTS) == set(config_module.SPLIT_SCHEMES)
    # a preset's own dataset keeps the preset's settings
    assert resolve_config(overrides={"data.split_scheme": "maml"}).data.rotations is True


@pytest.mark.parametrize("mode, shape, preset", [("L", (1, 28, 28), "omniglot-maml-5w1s"),
                                                 ("RGB", (3, 84, 84), "omniglot-maml-5w1s"),
                                                 ("L", (1, 28, 28), "mini-imagenet-maml-5w1s")])
def test_train_on_a_folder_with_any_preset(tmp_path: Path, capsys: pytest.CaptureFixture, mode: str,
                                           shape: tuple, preset: str) -> None:
    data = _folder(tmp_path / "data", "mine", mode)
    code = cli.main(["train", "--preset", preset, "--set", "data.dataset=folder", "--set", "data.folder=mine",
                     "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"), *FOLDER_RUN,
                     "--run-dir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "test accuracy" in out
    assert cli.main(["data", "info", "folder", "--folder", "mine", "--data-dir", str(data),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert f"image_shape: {' x '.join(map(str, shape))}" in out and "train: 6 classes, 5 images" in out


def test_data_info_folder_needs_the_folder(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["data", "info", "folder"]) == 2
    assert "--folder NAME" in capsys.readouterr().err


def test_the_networks_follow_the_images() -> None:
    assert OmniglotCNN(5, hidden_size=4, channels=3)(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    gray = MiniImagenetCNN(5, hidden_size=4, channels=1, image_size=28)
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    torch.manual_seed(0)
    default = OmniglotCNN(5, hidden_size=4)  # the same parameters, drawn in the same order, as before
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), OmniglotCNN(5, hidden_size=4,
                                                                                   channels=1).parameters()))


def test_a_network_that_cannot_take_the_images_fails_before_any_run_file(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path / "data", "gray", "L")
    monkeypatch.setattr(setup, "make_model", lambda model, ways, shape: MiniImagenetCNN(ways, hidden_size=4))
    run_dir = tmp_path / "runs" / "x"
    code = cli.main(["train", "--set", "data.dataset=folder", "--set", "data.folder=gray", "--data-dir",
                     str(data), "--cache-dir", str(tmp_path / "cache"), *FOLDER_RUN,
                     "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "first layer takes 3-channel images) cannot take gray's 1x28x28 images" in err
    assert not (tmp_path / "runs").exists()  # the folder it made for the run is gone again


def test_a_failed_start_leaves_no_half_made_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _folder(tmp_path / "data", "gray", "L")
    config = resolve_config(overrides={**TINY_OVERRIDES, "data.dataset": "folder", "data.folder": "gray",
                                       "data.data_dir": str(data), "data.cache_dir": str(tmp_path / "cache"),
                                       "run.run_dir": str(tmp_path / "run")})

    def fail(*args: object, **kwargs: object) -> None:
        raise TrainingError("the meta-training loss is nan at iteration 1")

    with monkeypatch.context() as mp:
        mp.setattr(loop, "compute_meta_gradients", fail)
        with pytest.raises(TrainingError):
            run(config, quiet=True)
    assert not (tmp_path / "run").exists()
    run(config, quiet=True)  # the next try needs no --overwrite
    assert (tmp_path / "run" / "results.json").is_file()
