"""Learned inner rates in the training loop (Meta-SGD's per parameter element, MAML++'s LSLR per tensor and
step): created, trained, checkpointed, resumed bit for bit, used by validation, the meta-test and
``evaluate_checkpoint``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from test_loop import RESUME_OVERRIDES, _assert_same_run, _Crash, _crash_at
from tiny_run import fake_load_dataset, tiny_config

from metagrad.algorithms import ALGORITHMS
from metagrad.errors import ConfigError, TrainingError
from metagrad.training import evaluate_checkpoint, loop, run, schedule, setup
from metagrad.training.checkpoint import restore_params
from metagrad.training.rates import inner_learning_rate, inner_rates, restore_rates

META_SGD = {"meta.learned_inner_lr": "per-parameter", "meta.inner_lr": 0.1, "meta.inner_lr_init_low": 0.005}
LSLR = {"meta.learned_inner_lr": "per-layer-per-step", "meta.inner_lr": 0.1, "meta.inner_steps": 2}
MAMLPP = {**LSLR, "meta.per_step_bn": True, "meta.iterations_per_epoch": 2, "meta.msl_epochs": 2,
          "meta.lr_schedule": "cosine", "meta.min_meta_lr": 0.0001}
"""Every MAML++ option at once: LSLR, per-step BatchNorm weights (BNWB), MSL, epochs and CA."""
KINDS = {"meta-sgd": META_SGD, "lslr": LSLR, "maml++": MAMLPP}


@pytest.fixture(scope="module")
def learned_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One uninterrupted run of each kind of learned rates (test_inner_steps 2; LSLR: 2 train steps)."""
    runs = {}
    for kind, overrides in KINDS.items():
        runs[kind] = tmp_path_factory.mktemp(kind) / "run"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(setup, "load_dataset", fake_load_dataset())
            run(tiny_config(runs[kind], **RESUME_OVERRIDES, **overrides), quiet=True)
    return runs


@pytest.fixture
def meta_sgd_run(learned_runs: dict[str, Path]) -> Path:
    return learned_runs["meta-sgd"]


def _rates(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["inner_lrs"]


def test_rates_are_trained_and_saved(meta_sgd_run: Path) -> None:
    latest = torch.load(meta_sgd_run / "latest.pt", weights_only=True)
    assert set(latest["inner_lrs"]) == set(latest["params"])
    assert all(r.shape == latest["params"][k].shape for k, r in latest["inner_lrs"].items())
    start = inner_rates(tiny_config(meta_sgd_run, **META_SGD).meta,
                             {k: torch.zeros_like(v) for k, v in latest["params"].items()}, seed=0)
    still = {k for k, r in latest["inner_lrs"].items() if torch.equal(r, start[k].detach())}
    # Adam moved every rate but maybe a conv bias's: BatchNorm cancels those biases, so their gradient
    # (and their rate's meta-gradient) is 0 up to rounding.
    assert all(k.endswith("conv.bias") for k in still) and len(still) < len(start) // 4
    assert set(_rates(meta_sgd_run / "best.pt")) == set(latest["params"])
    # The Adam state covers parameters and rates.
    assert len(latest["optimizer"]["state"]) == 2 * len(latest["params"])


def test_lslr_rates_are_one_scalar_per_tensor_and_step(learned_runs: dict[str, Path]) -> None:
    latest = torch.load(learned_runs["lslr"] / "latest.pt", weights_only=True)
    names = list(latest["params"])
    assert list(latest["inner_lrs"]) == [f"{step}.{name}" for step in range(2) for name in names]
    assert all(r.dim() == 0 for r in latest["inner_lrs"].values())
    moved = [k for k, r in latest["inner_lrs"].items() if r.item() != pytest.approx(0.1, abs=0)]
    assert len(moved) > len(names)  # trained: they no longer all sit at inner_lr


def test_per_step_bn_copies_are_trained_and_saved(learned_runs: dict[str, Path]) -> None:
    latest = torch.load(learned_runs["maml++"] / "latest.pt", weights_only=True)
    params, start = latest["params"], torch.load(learned_runs["lslr"] / "latest.pt", weights_only=True)
    norm = [k for k in start["params"] if ".norm." in k]
    assert norm and not set(norm) & set(params)  # each BatchNorm weight and bias replaced by its copies
    copies = {f"{k}@step{s}" for k in norm for s in range(2)}
    assert set(params) == (set(start["params"]) - set(norm)) | copies
    # Trained apart: the copies of one parameter start equal and differ after training.
    assert all(not torch.equal(params[f"{k}@step0"], params[f"{k}@step1"]) for k in norm)
    # LSLR rates for the adapted tensors only (the copies are not adapted), Adam state for all.
    assert set(latest["inner_lrs"]) == {f"{s}.{k}" for s in range(2) for k in params if "@" not in k}
    assert len(latest["optimizer"]["state"]) == len(params) + len(latest["inner_lrs"])
    best = torch.load(learned_runs["maml++"] / "best.pt", weights_only=True)
    assert set(best["params"]) == set(params)


def test_test_time_steps_beyond_training_take_the_last_steps_lslr_rates() -> None:
    meta = tiny_config(Path("x"), **LSLR).meta
    rates = inner_rates(meta, {"w": torch.zeros(3), "b": torch.zeros(())}, seed=0)
    per_step = inner_learning_rate(meta, rates, 4)
    assert [sorted(d) for d in per_step] == [["b", "w"]] * 4
    assert [d["w"] for d in per_step] == [rates["0.w"], rates["1.w"], rates["1.w"], rates["1.w"]]
    sgd = tiny_config(Path("x"), **META_SGD).meta
    sgd_rates = inner_rates(sgd, {"w": torch.zeros(3)}, seed=0)
    assert inner_learning_rate(sgd, sgd_rates, 4) is sgd_rates  # the same rates for every step
    plain = tiny_config(Path("x")).meta
    assert inner_learning_rate(plain, inner_rates(plain, {"w": torch.zeros(3)}, 0), 4) == 0.4


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_resume_after_a_crash_is_bit_identical_with_learned_rates(
    tmp_path: Path, fake_data: list, learned_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **RESUME_OVERRIDES, **KINDS[kind])
    with monkeypatch.context() as mp:
        _crash_at(mp, 5)
        with pytest.raises(_Crash):
            run(config, quiet=True)
    run(config, resume=True, quiet=True)
    _assert_same_run(run_dir, learned_runs[kind])
    for name in ("latest.pt", "best.pt"):
        ours, theirs = _rates(run_dir / name), _rates(learned_runs[kind] / name)
        assert all(torch.equal(ours[k], t) for k, t in theirs.items()), name


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_evaluate_checkpoint_uses_the_learned_rates(fake_data: list, learned_runs: dict[str, Path],
                                                    kind: str) -> None:
    results = json.loads((learned_runs[kind] / "results.json").read_text())
    evaluation = evaluate_checkpoint(learned_runs[kind])
    assert evaluation["test_accuracy"] == results["test_accuracy"]
    assert evaluation["test_loss"] == results["test_loss"]


def test_a_checkpoint_without_rates_is_refused(tmp_path: Path, fake_data: list, meta_sgd_run: Path) -> None:
    state = torch.load(meta_sgd_run / "best.pt", weights_only=True)
    rates = inner_rates(tiny_config(tmp_path, **META_SGD).meta, state["params"], seed=0)
    del state["inner_lrs"]
    with pytest.raises(TrainingError, match="learned inner rates"):
        restore_rates(rates, state, tmp_path / "best.pt")


def test_learned_rate_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown meta.learned_inner_lr 'per-layer'"):
        tiny_config(Path("x"), **{"meta.learned_inner_lr": "per-layer"})
    with pytest.raises(ConfigError, match="needs meta.learned_inner_lr"):
        tiny_config(Path("x"), **{"meta.inner_lr_init_low": 0.01})
    with pytest.raises(ConfigError, match="needs meta.learned_inner_lr"):
        tiny_config(Path("x"), **{**LSLR, "meta.inner_lr_init_low": 0.01})
    with pytest.raises(ConfigError, match=r"inner_lr_init_low must be in \[0, meta.inner_lr=0.1\)"):
        tiny_config(Path("x"), **{**META_SGD, "meta.inner_lr_init_low": 0.2})
    # ANIL beside per-step BatchNorm runs the whole forward with only the head adapted: not refused
    anil = tiny_config(Path("x"), **{"meta.per_step_bn": True, "meta.algorithm": "anil"}).meta
    assert anil.per_step_bn and anil.algorithm == "anil"


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_the_learner_makes_the_configs_algorithm_with_its_rates(fake_data: list, algorithm: str) -> None:
    overrides = {**LSLR, "meta.algorithm": algorithm, "meta.first_order": True, "meta.test_inner_steps": 3}
    config = tiny_config(Path("x"), **overrides)
    learner = setup.prepare(config, torch.device("cpu"), ("test",), init_seed=0).learner
    meta = config.meta
    train = learner.algorithm(meta, step_weights=[0.4, 0.6])
    assert type(train) is ALGORITHMS[algorithm]
    assert (train.inner_steps, train.first_order, train.step_weights) == (2, True, [0.4, 0.6])
    assert train.inner_lr == inner_learning_rate(meta, learner.rates, 2)
    assert all(r.requires_grad for step in train.inner_lr for r in step.values())  # learned: meta-gradient
    test = learner.algorithm(meta, test=True, step_weights=[0.4, 0.6])
    assert type(test) is ALGORITHMS[algorithm]
    # meta-testing: test_inner_steps, the last step's rates beyond training's, the last step scored; the
    # evaluation detaches the rates and runs first order itself (Algorithm.detached)
    assert (test.inner_steps, test.step_weights) == (3, None)
    assert [step["classifier.weight"] for step in test.inner_lr] == [
        learner.rates[f"{s}.classifier.weight"] for s in (0, 1, 1)]


def test_a_checkpoint_with_other_per_step_bn_is_refused(fake_data: list,
                                                        learned_runs: dict[str, Path]) -> None:
    state = torch.load(learned_runs["maml++"] / "best.pt", weights_only=True)
    params = setup.prepare(tiny_config(Path("x"), **LSLR), torch.device("cpu"), ("test",),
                           init_seed=0).learner.params
    with pytest.raises(ConfigError, match="meta.per_step_bn=True"):
        restore_params(params, state, learned_runs["maml++"] / "best.pt", tiny_config(Path("x"), **LSLR))


# --------------------------------------------------------------------------------------------------
# MAML++'s epochs, cosine floor (CA) and derivative-order annealing (DA)
# --------------------------------------------------------------------------------------------------


def test_epochs_count_as_the_reference_code_counts_them() -> None:
    meta = tiny_config(Path("x"), **{"meta.iterations_per_epoch": 3}).meta
    assert [schedule.epoch_of(meta, i) for i in range(1, 8)] == [0, 0, 0, 1, 1, 1, 2]
    assert schedule.epoch_of(tiny_config(Path("x")).meta, 7) == 0  # no epochs


def test_cosine_anneals_to_its_floor_step_by_step_or_epoch_by_epoch() -> None:
    meta = tiny_config(Path("x"), **{"meta.lr_schedule": "cosine", "meta.iterations": 8,
                                     "meta.meta_lr": 0.01, "meta.min_meta_lr": 0.001}).meta
    lrs = [schedule.learning_rate(meta, i) for i in range(1, 9)]
    assert lrs == pytest.approx([0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)],
                                rel=1e-12)
    assert lrs[0] == pytest.approx(0.01, rel=1e-12) and lrs[-1] > 0.001 and lrs == sorted(lrs, reverse=True)
    # Past the planned iterations (a run extended on resume) it stays at the floor instead of rising again.
    assert [schedule.learning_rate(meta, i) for i in (9, 12, 16)] == pytest.approx([0.001] * 3, rel=1e-12)
    # With epochs of 4 iterations: torch's CosineAnnealingLR(T_max=2 epochs, eta_min) stepped per epoch.
    per_epoch = dataclasses.replace(meta, iterations_per_epoch=4)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2, eta_min=0.001)
    expected = []
    for _epoch in range(2):
        expected += [optimizer.param_groups[0]["lr"]] * 4
        optimizer.step()
        scheduler.step()
    assert [schedule.learning_rate(per_epoch, i) for i in range(1, 9)] == pytest.approx(expected, rel=1e-12)


def test_derivative_order_annealing_trains_first_order_for_the_first_epochs(
    tmp_path: Path, fake_data: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders = []
    real = loop.compute_meta_gradients

    def compute(learner, episode, meta, *rest):
        orders.append(meta.first_order)
        return real(learner, episode, meta, *rest)

    monkeypatch.setattr(loop, "compute_meta_gradients", compute)
    run(tiny_config(tmp_path / "run", **{"meta.iterations_per_epoch": 2, "meta.first_order_epochs": 2}),
        quiet=True)
    assert orders == [True] * 4 + [False] * 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["meta"]
    assert (saved["first_order"], saved["first_order_epochs"]) == (False, 2)


def test_epoch_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="min_meta_lr is where an annealed schedule ends"):
        tiny_config(Path("x"), **{"meta.min_meta_lr": 1e-5})
    with pytest.raises(ConfigError, match=r"min_meta_lr must be in \[0, meta.meta_lr=0.001\)"):
        tiny_config(Path("x"), **{"meta.lr_schedule": "cosine", "meta.min_meta_lr": 0.01})
    with pytest.raises(ConfigError, match="first_order_epochs counts epochs"):
        tiny_config(Path("x"), **{"meta.first_order_epochs": 2})
    with pytest.raises(ConfigError, match="first_order is true throughout"):
        tiny_config(Path("x"), **{"meta.first_order_epochs": 2, "meta.iterations_per_epoch": 5,
                                  "meta.algorithm": "fomaml", "meta.first_order": True})
    with pytest.raises(ConfigError, match="iterations_per_epoch must be 0"):
        tiny_config(Path("x"), **{"meta.iterations_per_epoch": -1})


def test_multi_step_loss_weights_anneal_as_the_reference_code() -> None:
    # The Omniglot MAML++ config: 5 inner steps, MSL over the first 10 epochs.
    meta = tiny_config(Path("x"), **{"meta.inner_steps": 5, "meta.iterations_per_epoch": 2,
                                     "meta.msl_epochs": 10, "meta.iterations": 30}).meta

    def at_epoch(epoch: int) -> list[float] | None:
        return schedule.multi_step_loss_weights(meta, 2 * epoch + 1)

    assert at_epoch(0) == pytest.approx([0.2] * 5)  # all equal at the start
    assert at_epoch(5) == pytest.approx([0.1] * 4 + [0.6])
    assert at_epoch(9) == pytest.approx([0.02] * 4 + [0.92])  # the last step dominates
    assert at_epoch(10) is None and at_epoch(14) is None  # then the last step's loss alone
    for epoch in range(10):
        assert sum(at_epoch(epoch)) == pytest.approx(1.0)
    long = dataclasses.replace(meta, msl_epochs=50, iterations_per_epoch=1, iterations=60)
    floors = [0.03 / 5] * 4 + [1 - 4 * 0.03 / 5]  # the earlier steps at their floor, the last at its cap
    assert schedule.multi_step_loss_weights(long, 50) == pytest.approx(floors)
    assert schedule.multi_step_loss_weights(tiny_config(Path("x")).meta, 1) is None


def test_multi_step_loss_in_training(tmp_path: Path, fake_data: list,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    weights = []
    real = loop.compute_meta_gradients

    def compute(*args):
        weights.append(args[3])  # learner, episode, meta, step_weights
        return real(*args)

    monkeypatch.setattr(loop, "compute_meta_gradients", compute)
    run(tiny_config(tmp_path / "run", **{"meta.inner_steps": 2, "meta.iterations_per_epoch": 2,
                                         "meta.msl_epochs": 2}), quiet=True)
    assert weights == [pytest.approx([0.5, 0.5])] * 2 + [pytest.approx([0.25, 0.75])] * 2 + [None] * 2
    with pytest.raises(ConfigError, match="msl_epochs counts epochs"):
        tiny_config(tmp_path, **{"meta.msl_epochs": 2})
