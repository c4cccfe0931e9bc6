"""Scoring adapted tasks: validation during training, the meta-test at the end of a run, and
:func:`evaluate_checkpoint`, which meta-tests a run's checkpoint again later.

:func:`score_tasks` adapts to tasks with the test-time inner loop and scores them (split across processes
under torchrun); :func:`meta_test` tests a run's best parameters and writes ``results.json``;
:func:`evaluate_checkpoint` writes ``eval_<checkpoint>.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad import algorithms
from metagrad.data.episodes import EpisodeSampler, task_generator
from metagrad.errors import ConfigError
from metagrad.training import distributed
from metagrad.training.checkpoint import check_model_settings, load_checkpoint
from metagrad.training.config import (
    CONFIG_NAME,
    Config,
    DataConfig,
    absolute_folders,
    config_from_dict,
    config_to_dict,
    load_config_file,
)
from metagrad.training.distributed import ONE_PROCESS, World
from metagrad.training.failures import step_guard
from metagrad.training.metrics import mean_ci95, report_row
from metagrad.training.run_folder import BEST_NAME, LATEST_NAME, RESULTS_NAME, resume_command, write_result
from metagrad.training.runlock import lock_run_dir
from metagrad.training.setup import Learner, TrainingRun, prepare, resolve_device, versions, warn_if_spinning
from metagrad.training.signals import StopFlag, TrainingInterrupted

__all__ = [
    "CI95_FORMULA",
    "evaluate_checkpoint",
    "evaluation_config",
    "meta_test",
    "score_tasks",
    "score_test_tasks",
    "training_progress",
]

logger = logging.getLogger(__name__)


CI95_FORMULA = "1.96 * sample std (ddof=1) / sqrt(n) over per-task accuracies"


def score_tasks(
    config: Config,
    learner: Learner,
    sampler: EpisodeSampler,
    num_tasks: int,
    generator: torch.Generator,
    stop: StopFlag | None = None,
    world: World = ONE_PROCESS,
) -> tuple[Tensor, Tensor]:
    """Adapt ``learner`` to ``num_tasks`` tasks with the test-time inner loop (its learned inner rates, if
    any, in place of ``meta.inner_lr``); per-task query losses and accuracies.

    Tasks are sampled and scored ``meta_batch_size`` at a time (to bound memory), so the tasks drawn
    from ``generator`` depend only on the seed, ``num_tasks`` and ``meta_batch_size``. With several
    processes, each samples every chunk and scores its own slice of it; the scores are gathered back
    in task order, so every process returns all ``num_tasks`` scores, as one process would.
    Scoring is ``algorithms.evaluate_with_losses`` (first-order inner loop, no outer graph).
    """
    meta = config.meta
    losses, accs, indices = [], [], []
    # a chunk of tasks still running GRACE_S after SIGINT/SIGTERM is cut short (stop.check between them)
    with stop.abortable("") if stop is not None else contextlib.nullcontext():
        for start in range(0, num_tasks, meta.meta_batch_size):
            if stop is not None:
                stop.check(world)
            episode = sampler.sample(min(meta.meta_batch_size, num_tasks - start), generator)
            first, last = distributed.task_range(episode.num_tasks, world)
            if first == last:  # fewer tasks in this chunk than processes
                continue
            task_loss, task_acc = algorithms.evaluate_with_losses(
                learner.algorithm(meta, test=True), learner.model, learner.params, learner.buffers,
                episode.slice(first, last), vectorize=meta.vectorize,
            )
            losses.append(task_loss.float().cpu())
            accs.append(task_acc.float().cpu())
            indices.append(torch.arange(start + first, start + last))
    if not indices:  # more processes than tasks: this one scored none
        losses, accs, indices = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    scores = torch.stack([torch.cat(losses), torch.cat(accs)], dim=1)  # (tasks here, 2): loss, accuracy
    scores = distributed.gather_tasks(world, scores, torch.cat(indices), num_tasks)  # (num_tasks, 2)
    return scores[:, 0], scores[:, 1]


def meta_test(run: TrainingRun) -> dict[str, Any]:
    """Score best.pt (latest where there is none) on the test tasks and write results.json."""
    config, run_dir, world, state = run.config, run.run_dir, run.world, run.state
    best = distributed.on_main(world, load_checkpoint, run_dir / BEST_NAME)
    checkpoint_name = "latest"
    if best is not None:
        checkpoint_name = "best"
        run.learner.restore(best, run_dir / BEST_NAME, config)
    if world.is_main:
        logger.info("meta-testing %s.pt (iteration %s) on %d tasks with %d inner steps", checkpoint_name,
                    best["iteration"] if best is not None else state.iteration, config.run.test_tasks,
                    config.meta.test_inner_steps)
    start = time.perf_counter()
    try:
        test = score_test_tasks(config, run.learner, run.samplers["test"], config.run.test_tasks, run.stop,
                                world)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(
            f"{exc} during the meta-test; training is complete and saved: "
            f"{resume_command(world, run_dir)} runs the meta-test again", exc.exit_code - 128
        ) from None
    seconds = time.perf_counter() - start
    # The test row's step is the iteration of the parameters tested (best.pt's), not the last one.
    tested_iteration = best["iteration"] if best is not None else state.iteration
    row = {"step": tested_iteration, "split": "test", "loss": test["test_loss"], "acc": test["test_accuracy"],
           "acc_ci95": test["test_ci95"], "tasks_per_sec": config.run.test_tasks / seconds}
    report_row(row, run.writer, run.progress)
    results = {
        "preset": config.preset,
        "algorithm": config.meta.algorithm,
        "dataset": config.data.dataset,
        "ways": config.data.ways,
        "shots": config.data.shots,
        "query_shots": config.data.query_shots,
        "iterations": state.iteration,
        **test,
        "checkpoint": checkpoint_name,
        "best_val_accuracy": state.best_val_accuracy,
        "best_iteration": state.best_iteration,
        "wall_time_s": state.elapsed_s + seconds,
        "device": str(run.device),
        "cpu_threads": torch.get_num_threads(),  # per process; the CPU's share of the wall time
        "processes": world.size,
        "seed": config.run.seed,
        "versions": versions(),
        "run_dir": str(run_dir),
    }
    if world.is_main:
        write_result(run_dir / RESULTS_NAME, results)
    logger.debug("test accuracy %.2f%% +/- %.2f%% over %d tasks; results in %s", 100 * test["test_accuracy"],
                 100 * test["test_ci95"], test["test_tasks"], run_dir / RESULTS_NAME)
    return results


def score_test_tasks(
    config: Config,
    learner: Learner,
    sampler: EpisodeSampler,
    num_tasks: int,
    stop: StopFlag | None = None,
    world: World = ONE_PROCESS,
) -> dict[str, Any]:
    """``score_tasks`` on the run's test tasks: accuracy, its 95% CI and the mean loss."""
    losses, accs = score_tasks(config, learner, sampler, num_tasks, task_generator(config.run.seed, "test"),
                               stop, world)
    accuracy, ci95 = mean_ci95(accs)
    return {
        "test_accuracy": accuracy,
        "test_ci95": ci95,
        "test_loss": losses.double().mean().item(),
        "test_tasks": num_tasks,
        "test_inner_steps": config.meta.test_inner_steps,
        "ci95_formula": CI95_FORMULA,
    }


def training_progress(run_dir: Path, config: Config, latest: dict[str, Any] | None) -> dict[str, Any]:
    """How far the run's training got, from ``latest.pt``: iterations done and planned, training time."""
    if latest is None:
        latest = load_checkpoint(run_dir / LATEST_NAME)
    if latest is None:  # best.pt without latest.pt: a run folder copied without its resumable state
        return {"iterations_planned": config.meta.iterations}
    done, planned = latest["iteration"], config.meta.iterations
    progress = latest.get("progress") or {}
    return {
        "status": "complete" if done >= planned else f"partial: {done} of {planned} iterations trained",
        "iterations": done,
        "iterations_planned": planned,
        "training_wall_time_s": progress.get("elapsed_s"),
    }


def evaluate_checkpoint(
    run_dir: str | Path,
    *,
    checkpoint: str = "best",
    test_tasks: int | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Meta-test a run's checkpoint again and write ``eval_<checkpoint>.json`` in the run folder.

    With the defaults this reproduces the run's ``results.json`` numbers (the same test tasks), and it
    works on a run that was interrupted (not on one still training: the folder is locked meanwhile,
    see :mod:`metagrad.training.runlock`): then the evaluation says how far training got
    (``iterations`` of ``iterations_planned``, from ``latest.pt``; ``status`` "partial"), and
    ``metagrad results`` shows it for a run that has no ``results.json`` yet.

    Args:
        run_dir: the run folder.
        checkpoint: ``"best"`` (best validation accuracy) or ``"latest"``.
        test_tasks: number of test tasks; None takes the run's ``test_tasks``.
        device: None takes the run's device setting.
        data_dir: None takes the run's data folder setting.
        cache_dir: None takes the run's cache folder setting.

    Returns:
        The evaluation: test accuracy, its 95% CI, the checkpoint's iteration, ...

    Raises:
        ConfigError: not a run folder, unknown checkpoint name, fewer than 2 test tasks, bad device; a
            checkpoint that does not fit config.json (the differing setting or parameter is named).
        RunFolderInUse: another process trains or evaluates in the folder.
        TrainingError: the checkpoint (and its previous copy) is unreadable or fails its checksum.
        ResultNotSaved: ``eval_<checkpoint>.json`` cannot be written (``.result`` holds the evaluation).
    """
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "latest"):
        raise ConfigError(f"--checkpoint must be best or latest, got {checkpoint!r}")
    config = evaluation_config(run_dir, test_tasks=test_tasks, device=device, data_dir=data_dir,
                               cache_dir=cache_dir)
    with lock_run_dir(run_dir, "eval", create=False):
        return _evaluate(run_dir, checkpoint, config)


def evaluation_config(run_dir: Path, *, test_tasks: int | None, device: str | None, data_dir: str | None,
                      cache_dir: str | None) -> Config:
    """The run's config.json with the evaluation's options in place of its own (None keeps the run's).

    Raises:
        ConfigError: ``run_dir`` is not a run folder, or an option is invalid.
    """
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"{run_dir} is not a run folder (it holds no {CONFIG_NAME})")
    config = config_from_dict(load_config_file(run_dir / CONFIG_NAME), source=str(run_dir / CONFIG_NAME))
    _warn_if_relative(config.data, run_dir / CONFIG_NAME, data_dir=data_dir, cache_dir=cache_dir)
    overrides = {"test_tasks": test_tasks, "device": device}
    config = dataclasses.replace(
        config,
        run=dataclasses.replace(config.run, **{k: v for k, v in overrides.items() if v is not None}),
        data=dataclasses.replace(config.data, data_dir=data_dir or config.data.data_dir,
                                 cache_dir=cache_dir or config.data.cache_dir),
    )
    return absolute_folders(config_from_dict(config_to_dict(config), source="eval options"))  # checks them


def _warn_if_relative(data: DataConfig, source: Path, **given: str | None) -> None:
    """Say so when a folder that ``given`` does not override is relative in ``source`` (runs made before
    config.json stored absolute folders): it is read from the current folder, maybe not the run's."""
    for name, value in given.items():
        saved = getattr(data, name)
        if value is None and saved and not Path(saved).expanduser().is_absolute():
            logger.warning("%s has a relative %s %r: it is read from %s; pass --%s if that is not where "
                           "the run found it", source, name, saved, Path.cwd(), name.replace("_", "-"))


def _evaluate(run_dir: Path, checkpoint: str, config: Config) -> dict[str, Any]:
    path = run_dir / f"{checkpoint}.pt"
    state = load_checkpoint(path)
    if state is None:
        raise ConfigError(f"{run_dir} holds no {checkpoint}.pt yet (no checkpoint was written)")
    check_model_settings(state, path, config)  # before the data is loaded: the clearest message first

    torch_device = resolve_device(config.run.device)
    warn_if_spinning(torch_device)
    prepared = prepare(config, torch_device, ("test",), init_seed=None)
    prepared.learner.restore(state, path, config)
    start = time.perf_counter()
    with StopFlag() as stop, step_guard(state.get("iteration", 0), path):
        test = score_test_tasks(config, prepared.learner, prepared.samplers["test"], config.run.test_tasks,
                                stop)
    evaluation = {
        "preset": config.preset,
        "checkpoint": checkpoint,
        "checkpoint_iteration": state.get("iteration"),
        **test,
        "wall_time_s": time.perf_counter() - start,
        "device": str(torch_device),
        "cpu_threads": torch.get_num_threads(),
        "versions": versions(),
        **training_progress(run_dir, config, state if checkpoint == "latest" else None),
    }
    write_result(run_dir / f"eval_{checkpoint}.json", evaluation)
    return evaluation
