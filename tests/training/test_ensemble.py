"""The K best validation checkpoints of a run (``run.keep_best``) and ``metagrad eval --ensemble K``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_loop import _Crash, _crash_at
from tiny_run import fake_load_dataset, tiny_config
from torch.testing import assert_close

from metagrad.algorithms import evaluate_with_losses, make
from metagrad.errors import ConfigError
from metagrad.models import OmniglotCNN
from metagrad.training import ensemble, evaluate_checkpoint, run, setup
from metagrad.training.metrics import read_metrics
from metagrad.training.top_k import TopCheckpoints, ranked_checkpoints
from metagrad.types import Episode

KEEP = {"meta.iterations": 8, "run.eval_every": 1, "run.checkpoint_every": 3, "run.keep_best": 3}
"""8 validations, the 3 best kept; a checkpoint every 3 iterations, so a crash falls between two."""


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("keep") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setup, "load_dataset", fake_load_dataset())
        run(tiny_config(run_dir, **KEEP), quiet=True)
    return run_dir


def _top(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = sorted((run_dir / "top").glob("*.pt"))
    return {p.name: torch.load(p, weights_only=True)["params"] for p in files}


def test_the_k_best_validation_checkpoints_are_kept(kept_run: Path) -> None:
    rows = [r for r in read_metrics(kept_run) if r["split"] == "validation"]
    ranked = sorted(rows, key=lambda r: (-r["acc"], r["step"]))[:3]  # ties: the earlier iteration first
    kept = ranked_checkpoints(kept_run)
    assert [(k.iteration, k.val_accuracy) for k in kept] == [(r["step"], r["acc"]) for r in ranked]
    assert sorted(p.name for p in (kept_run / "top").iterdir()) == sorted(
        f"iteration_{r['step']:09d}.pt" for r in ranked)  # no file of a checkpoint that left the top 3
    best = torch.load(kept_run / "best.pt", weights_only=True)
    first = torch.load(kept[0].path, weights_only=True)
    assert best["iteration"] == kept[0].iteration  # best.pt stays the best one
    assert all(torch.equal(first["params"][k], t) for k, t in best["params"].items())


def test_resume_after_a_crash_keeps_the_same_set(tmp_path: Path, kept_run: Path, fake_data: list,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir, **KEEP)
    with monkeypatch.context() as mp:
        _crash_at(mp, 8)  # after iteration 7's validation, past the checkpoint of iteration 6
        with pytest.raises(_Crash):
            run(config, quiet=True)
    run(config, resume=True, quiet=True)
    ours, theirs = _top(run_dir), _top(kept_run)
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[n][k], t) for n, params in theirs.items() for k, t in params.items())


def test_a_new_checkpoint_is_written_before_the_one_it_replaces_goes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from metagrad.training import top_k

    top = TopCheckpoints(tmp_path, 2)
    state = {"format": 1, "params": {"w": torch.zeros(2)}, "val_accuracy": 0.0, "iteration": 0}
    for iteration, acc in ((1, 0.5), (2, 0.7)):
        top.offer(acc, iteration, {**state, "iteration": iteration, "val_accuracy": acc})
    seen = []
    real = top_k.save_checkpoint

    def save(checkpoint: dict[str, Any], path: Path) -> None:
        seen.append(sorted(p.name for p in (tmp_path / "top").glob("*.pt")))  # before the write
        real(checkpoint, path)

    monkeypatch.setattr(top_k, "save_checkpoint", save)
    top.offer(0.6, 3, {**state, "iteration": 3, "val_accuracy": 0.6})
    assert seen == [["iteration_000000001.pt", "iteration_000000002.pt"]]  # 1 still there while 3 is written
    assert sorted(p.name for p in (tmp_path / "top").glob("*.pt")) == ["iteration_000000002.pt",
                                                                      "iteration_000000003.pt"]
    top.offer(0.1, 4, {**state, "iteration": 4, "val_accuracy": 0.1})  # not among the best: nothing written
    assert len(seen) == 1
    # A crash between writing and deleting leaves K + 1 files: the next start trims them.
    real({**state, "iteration": 5, "val_accuracy": 0.9}, tmp_path / "top" / "iteration_000000005.pt")
    again = TopCheckpoints(tmp_path, 2)
    assert [k.iteration for k in again.kept] == [5, 2]
    assert sorted(p.name for p in (tmp_path / "top").glob("*.pt")) == ["iteration_000000002.pt",
                                                                      "iteration_000000005.pt"]


def test_an_ensemble_of_one_is_the_single_model(kept_run: Path, fake_data: list) -> None:
    single = evaluate_checkpoint(kept_run)
    one = ensemble.evaluate_ensemble(kept_run, members=1)
    assert one["ensemble_test_accuracy"] == one["single_model_test_accuracy"]
    assert one["single_model_test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-9)
    assert one["checkpoints"][0]["iteration"] == single["checkpoint_iteration"]


def test_the_ensemble_averages_the_members_probabilities(kept_run: Path, fake_data: list,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Each member's probabilities are set by hand from the query labels (3 ways, 6 queries a task):
    # queries 0 and 3: members 0 and 1 put 0.55 on a wrong class and 0.45 on the right one, member 2 puts
    # 1.0 on the right one: the average is right (0.63), a majority vote would be wrong;
    # queries 1 and 4: every member 0.45 right, 0.55 wrong: wrong; queries 2 and 5: 0.9 right: right.
    calls = {"n": 0}
    episodes_per_member = 2  # test_tasks 8, meta_batch_size 4

    def fake(algorithm: Any, model: Any, params: Any, buffers: Any, episode: Any, **_: Any) -> torch.Tensor:
        member = calls["n"] // episodes_per_member
        calls["n"] += 1
        y = episode.query_y  # (T, 6)
        right = torch.tensor([[0.45, 0.45, 0.9] * 2]).expand_as(y).clone()
        if member == 2:
            right[:, [0, 3]] = 1.0
        probs = torch.zeros(*y.shape, 3)
        probs.scatter_(-1, y.unsqueeze(-1), right.unsqueeze(-1))
        probs.scatter_add_(-1, ((y + 1) % 3).unsqueeze(-1), (1 - right).unsqueeze(-1))
        return probs

    monkeypatch.setattr(ensemble, "query_probabilities", fake)
    result = ensemble.evaluate_ensemble(kept_run, members=3)
    assert [c["test_accuracy"] for c in result["checkpoints"]] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert result["single_model_test_accuracy"] == pytest.approx(1 / 3)  # the best-ranked checkpoint's
    assert result["ensemble_test_accuracy"] == pytest.approx(2 / 3)
    assert result["ensemble_rule"] == ensemble.ENSEMBLE_RULE
    saved = json.loads((kept_run / "results.json").read_text())["ensembles"]["3"]
    assert saved["single_model_test_accuracy"] == pytest.approx(1 / 3)
    assert saved["ensemble_test_accuracy"] == pytest.approx(2 / 3)
    assert json.loads((kept_run / "eval_ensemble3.json").read_text())["ensemble_test_accuracy"] == \
        pytest.approx(2 / 3)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_query_probabilities_are_what_evaluation_scores(algorithm: str) -> None:
    # A member's softmax probabilities after adaptation: their argmax gives evaluate's accuracies and the
    # mean negative log-probability of the labels its losses, task by task; no graph is kept.
    torch.manual_seed(0)
    model = OmniglotCNN(3, hidden_size=8).double()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    support_x, query_x = (torch.rand(3, n, 1, 28, 28, generator=g, dtype=torch.float64) for n in (3, 6))
    episode = Episode(support_x, torch.arange(3).repeat(3, 1), query_x, torch.arange(3).repeat(3, 2))
    learner = make(algorithm, inner_lr=0.4, inner_steps=3)
    probabilities = ensemble.query_probabilities(learner, model, params, {}, episode)
    assert probabilities.shape == (3, 6, 3) and not probabilities.requires_grad
    assert_close(probabilities.sum(dim=-1), torch.ones(3, 6, dtype=torch.float64))
    losses, accs = evaluate_with_losses(learner, model, params, {}, episode, vectorize=False)
    picked = probabilities.gather(-1, episode.query_y.unsqueeze(-1)).squeeze(-1)
    assert_close(-picked.log().mean(dim=1), losses, rtol=1e-10, atol=0)
    assert_close((probabilities.argmax(dim=-1) == episode.query_y).double().mean(dim=1), accs)
    assert all(p.grad is None for p in model.parameters())


def test_too_few_checkpoints_for_the_ensemble_are_refused(kept_run: Path, tmp_path: Path,
                                                          fake_data: list) -> None:
    with pytest.raises(ConfigError, match=r"--ensemble 4 needs 4 checkpoints but .* keeps 3 .*keep_best = 3.*"
                                          r"pass --ensemble 3 or fewer, or train with --set run.keep_best=4"):
        ensemble.evaluate_ensemble(kept_run, members=4)
    plain = tmp_path / "plain"
    run(tiny_config(plain), quiet=True)
    with pytest.raises(ConfigError, match=r"keeps 1 \(best.pt alone: run.keep_best = 1\).*keep_best=2"):
        ensemble.evaluate_ensemble(plain, members=2)
    with pytest.raises(ConfigError, match="at least 1"):
        ensemble.evaluate_ensemble(plain, members=0)
    with pytest.raises(ConfigError, match=r"run.keep_best \(--set run.keep_best=K\) must be positive"):
        tiny_config(plain, **{"run.keep_best": 0})


def test_overwrite_removes_the_kept_checkpoints(tmp_path: Path, fake_data: list) -> None:
    run_dir = tmp_path / "run"
    run(tiny_config(run_dir, **KEEP), quiet=True)
    assert len(list((run_dir / "top").glob("*.pt"))) == 3
    run(tiny_config(run_dir, **{**KEEP, "meta.iterations": 2}), quiet=True, overwrite=True)
    assert sorted(p.name for p in (run_dir / "top").glob("*.pt")) == [
        "iteration_000000001.pt", "iteration_000000002.pt"]
