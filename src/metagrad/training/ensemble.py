"""``metagrad eval RUN --ensemble K``: the test tasks scored by the K best validation checkpoints together.

Each member (``top/``'s K best checkpoints, see :mod:`metagrad.training.top_k`; ``best.pt`` for K = 1)
adapts to each test task with the test-time inner loop; the ensemble's prediction for a query is the
argmax of the members' softmax probabilities averaged over the members. The MAML++ paper reports such an
ensemble of its 5 best checkpoints (its code, ``experiment_builder.py``, averages the members' outputs
before the argmax, as here).

The test tasks are those of ``results.json`` and ``metagrad eval`` (the same generator, drawn the same
way), and the best member's accuracy is reported beside the ensemble's. Adaptation runs one task at a
time (the loop strategy, the reference every strategy is tested against).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagrad.algorithms import Algorithm, Tasks
from metagrad.algorithms.strategies import looped
from metagrad.data._io import read_json
from metagrad.data.episodes import EpisodeSampler, task_generator
from metagrad.errors import ConfigError, ResultNotSaved
from metagrad.training.checkpoint import load_checkpoint
from metagrad.training.config import Config
from metagrad.training.evaluation import CI95_FORMULA, evaluation_config
from metagrad.training.metrics import mean_ci95
from metagrad.training.run_folder import BEST_NAME, RESULTS_NAME, TOP_DIR, write_result
from metagrad.training.runlock import lock_run_dir
from metagrad.training.setup import prepare, resolve_device, versions
from metagrad.training.signals import StopFlag
from metagrad.training.top_k import Ranked, ranked_checkpoints
from metagrad.types import Buffers, Episode, Params

__all__ = ["ENSEMBLE_RULE", "evaluate_ensemble", "query_probabilities"]

ENSEMBLE_RULE = "argmax of the members' softmax probabilities averaged per query"


def query_probabilities(algorithm: Algorithm, model: nn.Module, params: Params, buffers: Buffers,
                        episode: Episode) -> Tensor:
    """(T, N*Q, N) softmax probabilities of each task's queries after ``algorithm`` adapts to its support
    set, one task at a time with the first-order inner loop (the same values at test time). Nothing is kept
    for a backward pass."""
    algorithm = algorithm.detached()
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():  # the inner loop re-enables what it needs (functional.inner_loop)
        return torch.cat([algorithm.adapt(Tasks(model, params, buffers, episode.slice(t, t + 1), looped))
                          .outputs().softmax(dim=-1) for t in range(episode.num_tasks)])


def evaluate_ensemble(
    run_dir: str | Path,
    *,
    members: int,
    test_tasks: int | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Score the run's ``members`` best validation checkpoints as an ensemble on its test tasks.

    Writes ``eval_ensemble<K>.json`` and adds the single-model and ensemble accuracies to the run's
    ``results.json`` (under ``"ensembles"``, keyed by K) when it has one.

    Args:
        run_dir: the run folder.
        members: K, the number of checkpoints (the run must keep that many: ``run.keep_best >= K``;
            K = 1 is ``best.pt``).
        test_tasks, device, data_dir, cache_dir: as for ``evaluate_checkpoint``.

    Returns:
        ``single_model_test_accuracy`` (the best checkpoint's) and ``ensemble_test_accuracy`` with their
        95% CIs over the test tasks, and each member's iteration, validation and test accuracy.

    Raises:
        ConfigError: K < 1; the run keeps fewer than K checkpoints (the message says how many and what
            to change); not a run folder, bad options (as ``evaluate_checkpoint``).
        RunFolderInUse: another process trains or evaluates in the folder.
        ResultNotSaved: the result could not be written (``.result`` holds it).
    """
    run_dir = Path(run_dir)
    if members < 1:
        raise ConfigError(f"--ensemble needs at least 1 checkpoint, got {members}")
    config = evaluation_config(run_dir, test_tasks=test_tasks, device=device, data_dir=data_dir,
                               cache_dir=cache_dir)
    with lock_run_dir(run_dir, "eval", create=False):
        return _evaluate_ensemble(run_dir, _members(run_dir, config, members), config)


def _members(run_dir: Path, config: Config, members: int) -> list[Ranked]:
    if config.run.keep_best > 1:
        kept = ranked_checkpoints(run_dir)
        where = f"in {run_dir / TOP_DIR} (run.keep_best = {config.run.keep_best})"
    else:
        best = load_checkpoint(run_dir / BEST_NAME)
        kept = [] if best is None else [Ranked(float(best["val_accuracy"]), int(best["iteration"]),
                                               run_dir / BEST_NAME)]
        where = "(best.pt alone: run.keep_best = 1)"
    if len(kept) < members:
        fix = (f"pass --ensemble {len(kept)} or fewer, or " if kept else "") + \
              f"train with --set run.keep_best={members}"
        raise ConfigError(f"--ensemble {members} needs {members} checkpoints but {run_dir} keeps {len(kept)} "
                          f"{where}: {fix}")
    return kept[:members]


def _test_episodes(config: Config, sampler: EpisodeSampler, stop: StopFlag) -> Iterator[Episode]:
    # The test tasks of score_tasks (evaluation.py): the same generator, meta_batch_size tasks at a time.
    generator = task_generator(config.run.seed, "test")
    for start in range(0, config.run.test_tasks, config.meta.meta_batch_size):
        stop.check()
        yield sampler.sample(min(config.meta.meta_batch_size, config.run.test_tasks - start), generator)


def _evaluate_ensemble(run_dir: Path, members: list[Ranked], config: Config) -> dict[str, Any]:
    meta = config.meta
    torch_device = resolve_device(config.run.device)
    prepared = prepare(config, torch_device, ("test",), init_seed=None)
    learner = prepared.learner
    start = time.perf_counter()
    probabilities, labels = [], None
    with StopFlag() as stop:
        for member in members:
            state = load_checkpoint(member.path)
            learner.restore(state, member.path, config)
            episodes = list(_test_episodes(config, prepared.samplers["test"], stop))
            probabilities.append(torch.cat([
                query_probabilities(learner.algorithm(meta, test=True), learner.model, learner.params,
                                    learner.buffers, episode).float().cpu()
                for episode in episodes]))  # (tasks, N*Q, N)
            labels = torch.cat([episode.query_y.cpu() for episode in episodes])  # (tasks, N*Q)
    assert labels is not None
    single = [(p.argmax(dim=-1) == labels).float().mean(dim=1) for p in probabilities]  # each (tasks,)
    together = (torch.stack(probabilities).mean(dim=0).argmax(dim=-1) == labels).float().mean(dim=1)
    ensemble_acc, ensemble_ci = mean_ci95(together)
    checkpoints = []
    for member, accs in zip(members, single):
        accuracy, ci95 = mean_ci95(accs)
        checkpoints.append({"checkpoint": str(member.path.relative_to(run_dir)),
                            "iteration": member.iteration, "val_accuracy": member.val_accuracy,
                            "test_accuracy": accuracy, "test_ci95": ci95})
    summary = {
        "ensemble_members": len(members),
        "ensemble_rule": ENSEMBLE_RULE,
        "single_model_checkpoint": checkpoints[0]["checkpoint"],
        "single_model_test_accuracy": checkpoints[0]["test_accuracy"],
        "single_model_test_ci95": checkpoints[0]["test_ci95"],
        "ensemble_test_accuracy": ensemble_acc,
        "ensemble_test_ci95": ensemble_ci,
        "test_tasks": config.run.test_tasks,
        "test_inner_steps": meta.test_inner_steps,
        "ci95_formula": CI95_FORMULA,
    }
    evaluation = {"preset": config.preset, **summary, "checkpoints": checkpoints,
                  "wall_time_s": time.perf_counter() - start, "device": str(torch_device),
                  "cpu_threads": torch.get_num_threads(), "versions": versions()}
    results_path, saved = run_dir / RESULTS_NAME, run_dir / f"eval_ensemble{len(members)}.json"
    write_result(saved, evaluation)
    if results_path.is_file():
        try:
            results = read_json(results_path)
            if not isinstance(results, dict):
                raise TypeError("it does not hold a JSON object")
        except (OSError, ValueError, TypeError) as exc:
            raise ResultNotSaved(f"{results_path} cannot be read ({exc}) to add the ensemble's accuracy; "
                                 f"it is in {saved}", evaluation) from None
        results.setdefault("ensembles", {})[str(len(members))] = {**summary, "checkpoints": checkpoints}
        write_result(results_path, results)
    return evaluation
