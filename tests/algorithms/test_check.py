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
from metagrad.models import layers as mg_layers


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


class _FunctionalDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(64, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.dropout(self.body(x.flatten(1)).relu(), 0.3, self.training))


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.encoder = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.squeeze(1))).mean(dim=1))  # (B, 8 rows, 8) tokens


class _RandomNoise(_FunctionalDropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.body(x.flatten(1)).relu()
        return self.head(hidden * (torch.rand_like(hidden) > 0.3))


@pytest.mark.parametrize("make, named", [
    (lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                 torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)), "Dropout"),
    (lambda: torch.nn.Sequential(mg_layers.Flatten(), mg_layers.Linear(64, 16), torch.nn.ReLU(),
                                 torch.nn.Dropout2d(0.5), mg_layers.Linear(16, 3)), "Dropout2d"),
    (_FunctionalDropout, "F.dropout"),
    (_Attention, "Dropout, F.multi_head_attention_forward"),  # attention dropout too
])
def test_dropout_in_train_mode_is_exact_and_reported(make, named: str) -> None:
    # Each path draws its own masks: compared with them on, the paths differed by ~0.2 and the check
    # told users to report a bug. With dropout off on both paths the comparison is exact.
    model = make()
    before = torch.random.get_rng_state()
    report = check_model(model, (1, 8, 8), ways=3)
    assert report.ok and ", ".join(report.dropout) == named, str(report)
    assert f"dropout ({named}) turned off" in str(report) and "NOT exact" not in str(report)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random state is left alone


def test_a_model_without_dropout_reports_none() -> None:
    report = check_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), (1, 8, 8), ways=3)
    assert report.ok and report.dropout == () and "dropout" not in str(report)


def test_other_random_draws_give_no_verdict() -> None:
    report = check_model(_RandomNoise(), (1, 8, 8), ways=3)
    assert not report.comparable and not report.ok and report.random_error > 1e-3
    assert "cannot compare" in str(report) and "NOT exact" not in str(report)


def test_cli_check_on_dropout_passes_and_a_wrong_path_fails(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "dropout_models.py"
    source.write_text(
        "from torch import nn\n"
        "def Net(ways):\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),\n"
        "                         nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(144, ways))\n")
    assert main(["check", f"{source}:Net", "--kwargs", '{"ways": 5}', "--input-shape", "1,8,8"]) == 0
    assert "exact; dropout (Dropout) turned off" in capsys.readouterr().out
    passthrough = vmap_exact.ExactFunctions.__torch_function__

    def wrong_second_derivative(self, func, types, args=(), kwargs=None):  # as in the test above
        out = passthrough(self, func, types, args, kwargs)
        if func in (torch.nn.functional.batch_norm, torch.batch_norm):
            cube = out ** 3
            out = out + (cube - cube.detach()) - (out - out.detach()) * (3 * out ** 2).detach()
        return out

    monkeypatch.setattr(vmap_exact.ExactFunctions, "__torch_function__", wrong_second_derivative)
    assert main(["check", f"{source}:Net", "--kwargs", '{"ways": 5}', "--input-shape", "1,8,8"]) == 1
    assert "NOT exact" in capsys.readouterr().out
    sys.modules.pop("dropout_models", None)
