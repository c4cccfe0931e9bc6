"""``check_model`` and ``metagrad check``: users check their own model's meta-gradients before training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_user_models import ZOO, ConvBN

from metagrad import check_model, vmap_exact
from metagrad.cli import main
from metagrad.models import OmniglotCNN


@pytest.mark.parametrize("name", ["bn2d-running-stats", "residual", "layernorm", "frozen"])
def test_user_models_check_exact(name: str) -> None:
    report = check_model(ZOO[name](), (1, 8, 8), ways=3)
    assert report.ok and report.strategy == "vmap", str(report)
    assert "exact" in str(report) and "vmap path" in str(report)


def test_standard_model_checks_on_the_batched_path() -> None:
    report = check_model(OmniglotCNN(5, hidden_size=8), (1, 28, 28), algorithm="anil")
    assert report.ok and report.strategy == "batched"


def test_a_model_that_runs_on_the_loop_says_so() -> None:
    report = check_model(ConvBN(momentum=None), (1, 8, 8), ways=3)
    assert report.ok and report.strategy == "loop" and report.second_order_error == 0.0


def test_the_check_catches_an_inexact_vectorized_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A normalization whose value and first derivative are right under vmap but whose second derivative
    # is not (as torch's fused BatchNorm once was): only the second-order meta-gradient may differ.
    passthrough = vmap_exact.ExactFunctions.__torch_function__

    def wrong_second_derivative(self, func, types, args=(), kwargs=None):
        out = passthrough(self, func, types, args, kwargs)
        if func in (torch.nn.functional.batch_norm, torch.batch_norm):
            # zero in value and in first derivative; second derivative 6 * out
            cube = out ** 3
            out = out + (cube - cube.detach()) - (out - out.detach()) * (3 * out ** 2).detach()
        return out

    monkeypatch.setattr(vmap_exact.ExactFunctions, "__torch_function__", wrong_second_derivative)
    report = check_model(ConvBN(track_running_stats=False), (1, 8, 8), ways=3)
    assert report.strategy == "vmap"
    assert not report.ok, str(report)
    assert report.second_order_error > 1e-3 and report.first_order_error < 1e-10, str(report)
    assert "NOT exact" in str(report)


def test_the_original_model_is_not_changed() -> None:
    model = ConvBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model(model, (1, 8, 8), ways=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_cli_check_of_a_users_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "my_models.py"
    source.write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, ways):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())\n"
        "        self.head = nn.Linear(4, ways)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.body(x))\n")
    assert main(["check", f"{source}:Net", "--kwargs", '{"ways": 5}', "--input-shape", "1,8,8"]) == 0
    assert "Net: vmap path" in capsys.readouterr().out
    assert main(["check", f"{source}:Missing"]) == 2
    assert "has no class or function Missing" in capsys.readouterr().err
    assert main(["check", f"{source}:Net"]) == 2  # the constructor needs ways
    assert "--kwargs" in capsys.readouterr().err
    sys.modules.pop("my_models", None)


def test_cli_check_of_a_registered_model(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "omniglot-fc", "--ways", "3", "--tasks", "2"]) == 0
    assert "OmniglotFC: batched path" in capsys.readouterr().out


def test_bench_checks_a_presets_model() -> None:
    from metagrad.bench import check_preset_model
    from metagrad.training.config import load_preset

    report = check_preset_model(load_preset("omniglot-fomaml-5w1s"))
    assert report.ok and report.model == "OmniglotCNN" and report.strategy == "batched", str(report)


def test_cli_check_refuses_kwargs_that_are_not_a_json_object(capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "omniglot-fc", "--kwargs", "{bad"]) == 2
    assert "--kwargs is not JSON" in capsys.readouterr().err
