"""The experiment: meta-train, validate, checkpoint, meta-test, all in one run folder.

:func:`run` follows the walkthrough this project implements. It seeds torch and one task generator
per purpose, picks the device (CUDA, then Apple MPS, then CPU), loads the train, validation and test
splits, builds the model, and runs the outer loop: each iteration samples a meta-batch of training
tasks, adapts to each, averages the query losses and takes an Adam step. Every ``eval_every``
iterations the same ``eval_tasks`` validation tasks are adapted to and scored; the parameters with the
best validation accuracy are kept in ``best.pt`` beside the full state in ``latest.pt``. At the end
the best parameters are meta-tested on ``test_tasks`` tasks with ``test_inner_steps`` inner steps.

A run folder holds::

    config.json      the resolved config; ``metagrad train --config RUN/config.json`` repeats the run
    metrics.jsonl    one metric row per line (see metagrad.training.metrics); metrics.csv: the same rows
    loggers.json     with --logger: what TensorBoard (tensorboard/) and W&B (wandb/) hold of them
    latest.pt        everything needed to resume (latest.prev.pt: the one before)
    best.pt          the parameters with the best validation accuracy (best.prev.pt: the one before)
    results.json     the meta-test result

Reproducibility: a run is a deterministic function of its config on CPU. A resumed run (after
SIGINT, SIGTERM or ``kill -9``) restores the parameters, Adam's state, every random state and the
metrics files as they were at the checkpoint, so it ends with the same parameters, metrics and
results, bit for bit, as a run that was never interrupted (wall-clock columns excepted).

Data-parallel: under ``torchrun --nproc-per-node N -m metagrad train ...`` every process runs
:func:`run`. The step is split in two so that the exchange fits between: each process runs
:func:`compute_meta_gradients` on its slice of the meta-batch (``episode.slice``), the gradients are
all-reduced, then each runs :func:`apply_meta_update`. Validation and test tasks are split the same
way. Rank 0 alone writes the run folder and shows progress. The meta-gradients are summed in float64
(exact for a few float32 terms), so on CPU, when every process's share is cut into the same chunks of
tasks as one process's meta-batch, the run ends with one process's bits whatever the number of
processes (see :func:`metagrad.training.distributed.all_reduce_gradients`).

The other modules here each hold one concern of a run: :mod:`~metagrad.training.setup` (device, data,
model), :mod:`~metagrad.training.schedule` (per-iteration settings), :mod:`~metagrad.training.rates`
(learned inner rates), :mod:`~metagrad.training.evaluation` (validation, meta-test, ``evaluate_checkpoint``),
:mod:`~metagrad.training.run_folder`, :mod:`~metagrad.training.checkpoint`,
:mod:`~metagrad.training.signals` and :mod:`~metagrad.training.failures`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metagrad import algorithms
from metagrad.algorithms import MetaBatchOutput
from metagrad.data.episodes import task_generator
from metagrad.errors import ConfigError, FileError, MetagradError, ResultNotSaved, TrainingError
from metagrad.training import distributed
from metagrad.training.checkpoint import (
    FORMAT_VERSION,
    RunState,
    capture_rng_state,
    check_same_data,
    data_fingerprint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from metagrad.training.config import RESUMABLE_CHANGES, Config, MetaConfig, absolute_folders, config_to_dict
from metagrad.training.distributed import World
from metagrad.training.evaluation import meta_test, score_tasks
from metagrad.training.failures import check_finite, diverged, saved_note, step_guard
from metagrad.training.loggers import check_installed, open_loggers
from metagrad.training.metrics import (
    COLUMNS,
    MetricsWriter,
    gradient_norm,
    mean_ci95,
    peak_memory_mb,
    rate_columns,
    rate_values,
    report_row,
)
from metagrad.training.progress import Progress
from metagrad.training.run_folder import (
    BEST_NAME,
    CONFIG_NAME,
    LATEST_NAME,
    check_run_dir,
    create_run_dir,
    resume_command,
    run_dir_of,
    undo_failed_start,
)
from metagrad.training.runlock import lock_run_dir
from metagrad.training.schedule import iteration_settings, learning_rate, multi_step_loss_weights
from metagrad.training.setup import Learner, TrainingRun, prepare, resolve_device, versions, warn_if_spinning
from metagrad.training.signals import StopFlag, TrainingInterrupted
from metagrad.training.top_k import TopCheckpoints
from metagrad.types import Episode, StepWeights

__all__ = ["apply_meta_update", "compute_meta_gradients", "run"]

logger = logging.getLogger(__name__)


def compute_meta_gradients(
    learner: Learner, episode: Episode, meta: MetaConfig, step_weights: StepWeights = None,
) -> tuple[MetaBatchOutput, Tensor]:
    """Meta-gradient of a meta-batch (one process's share of it under torchrun), chunk by chunk.

    Args:
        learner: the model, its meta-learned parameters and buffers, and its learned inner rates (if
            any: in place of ``meta.inner_lr``).
        episode: T training tasks.
        meta: the algorithm and inner-loop settings (this iteration's: ``schedule.iteration_settings``).
        step_weights: MAML++'s multi-step loss weights of this iteration (``multi_step_loss_weights``).

    Returns:
        ``(out, grad_sum)``: the tasks' losses and accuracies (``out.loss`` is the mean query loss over
        the T tasks), and the gradient of the SUM of their query losses, flat (P + R,) float64 (the
        parameters', then the learned rates', as ``meta_parameters`` orders them).
        ``distributed.all_reduce_gradients`` turns it into every parameter's ``.grad``.
    """
    return algorithms.chunk_gradients(
        learner.algorithm(meta, step_weights=step_weights), learner.model, learner.params, learner.buffers,
        episode, vectorize=meta.vectorize, max_tasks_per_chunk=meta.tasks_per_chunk or None,
    )


def apply_meta_update(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One outer step with learning rate ``lr`` from the gradients in place, then clear them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run(
    config: Config, *, resume: bool = False, quiet: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Meta-train, validate and meta-test as ``config`` says, in a run folder.

    Args:
        config: the experiment (see :mod:`metagrad.training.config`).
        resume: continue the run in ``config.run.run_dir`` from its latest checkpoint. ``config`` may
            differ from the saved one only in settings that do not change the result
            (``config.RESUMABLE_CHANGES``: device, data and cache folders, checkpoint and log frequency).
        quiet: print nothing (no progress bar, no metric lines); the files are written all the same.
        overwrite: start a new run in a folder that holds an earlier run's files, replacing them (they
            are removed once the data has loaded). Without it such a folder is refused.

    Returns:
        The content of ``results.json``: test accuracy, its 95% CI, wall time, versions, ...

    Raises:
        ConfigError: a bad configuration, a device that is not available, a run folder that already
            holds a run's files (without ``resume`` or ``overwrite``) or holds no run (with ``resume``).
        RunFolderInUse: another process trains or evaluates in the run folder.
        FileError: a run file cannot be read or written (full disk, read-only folder...).
        ResultNotSaved: the meta-test ended but results.json could not be written (``.result`` holds it).
        DataError: the dataset is missing or corrupt.
        TrainingError: the loss became NaN or infinite (the last good checkpoint is kept).
        TrainingInterrupted: SIGINT or SIGTERM arrived; a checkpoint was written first.

    Example:
        >>> from metagrad.training import load_preset, run
        >>> config = load_preset("omniglot-maml-5w1s")
        >>> results = run(dataclasses.replace(config, meta=dataclasses.replace(config.meta, iterations=100)))

    References:
        Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks".
    """
    world = distributed.world_from_environment()
    distributed.check_meta_batch_size(config.meta.meta_batch_size, world)
    device = distributed.process_device(world, resolve_device(config.run.device))
    config = absolute_folders(config)
    check_installed(config.run.loggers)  # a missing extra fails before the run folder exists
    with distributed.process_group(world, device, config.run.dist_timeout_s), contextlib.ExitStack() as lock:

        def claim_run_dir() -> Path:  # rank 0 locks the folder for the whole run, then checks it
            run_dir = run_dir_of(config, resume)
            lock.enter_context(lock_run_dir(run_dir, "train"))
            check_run_dir(run_dir, config, resume, overwrite)
            return run_dir

        _check_same_config(world, config)
        run_dir = distributed.on_main(world, claim_run_dir)
        try:
            try:
                return _run(config, world, device, run_dir, resume=resume, quiet=quiet)
            except MetagradError as exc:  # settings to change (a crash keeps its files for --resume)
                if not resume and world.is_main and not isinstance(exc, FileError):
                    undo_failed_start(run_dir)  # failed before any checkpoint: no half-made run folder
                raise
        except FileError as exc:
            if isinstance(exc, ResultNotSaved) or not (run_dir / CONFIG_NAME).is_file():
                raise
            raise FileError(f"{exc}; the last checkpoint and metrics are intact: once that is fixed, "
                            f"continue with: {resume_command(world, run_dir)}") from None


def _run(config: Config, world: World, device: torch.device, run_dir: Path, *, resume: bool,
         quiet: bool) -> dict[str, Any]:
    meta = config.meta
    # Data first: a missing dataset or an impossible task shape fails before anything is written (the
    # locked folder, if this run created it, is removed again).
    prepared = prepare(config, device, ("train", "validation", "test"), init_seed=config.run.seed,
                       world=world)
    learner = prepared.learner
    if not resume:
        distributed.on_main(world, create_run_dir, config, run_dir)
    if world.is_main:
        where = f"{world.size} processes on {device.type}" if world.size > 1 else f"device {device}"
        if device.type == "cpu":
            where += f", {torch.get_num_threads()} thread(s)" + (" each" if world.size > 1 else "")
        logger.info("run folder %s, %s", run_dir, where)
        warn_if_spinning(device)

    # What the run trains and tests on, recorded in latest.pt: a resume on other data is refused.
    data = data_fingerprint({split: sampler.dataset for split, sampler in prepared.samplers.items()}) \
        if world.is_main else None
    optimizer = learner.optimizer(meta)
    generators = {"train": task_generator(config.run.seed, "train")}
    state = RunState()
    offsets = None

    # Rank 0 reads the checkpoint and hands it to every process: all restore the same random states,
    # since each samples the whole meta-batch.
    checkpoint = distributed.on_main(world, load_checkpoint, run_dir / LATEST_NAME) if resume else None
    if checkpoint is not None:
        distributed.on_main(world, check_same_data, checkpoint, data, run_dir / LATEST_NAME)
        learner.restore(checkpoint, run_dir / LATEST_NAME, config)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            restore_rng_state(checkpoint["rng"], generators, device)
            state = RunState(**checkpoint["progress"])
            offsets = {name: int(checkpoint["metrics"][name]) for name in ("jsonl", "csv")}
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checkpoint made by other means
            raise TrainingError(f"{run_dir / LATEST_NAME} is not a complete metagrad checkpoint "
                                f"({type(exc).__name__}: {exc}); start a new run, or restore the file"
                                ) from None
        if world.is_main:
            logger.info("resuming %s from iteration %d", run_dir, state.iteration)
    elif resume and world.is_main:
        logger.warning("%s holds no checkpoint yet: starting its run from iteration 0", run_dir)
    distributed.check_same_parameters(world, learner.meta_parameters(), state.iteration)

    writer = None
    if world.is_main:  # rank 0 alone writes files and logs
        writer = MetricsWriter(run_dir, offsets, COLUMNS + rate_columns(learner.rates))
    try:
        if writer is not None:
            writer.mirror(open_loggers(config, run_dir, writer.kept, state.iteration))
        with StopFlag(keep_handlers=world.size > 1) as stop:
            progress = Progress(meta.iterations, state.iteration, config.run.log_every,
                                enabled=not quiet and world.is_main)
            training = TrainingRun(config, run_dir, device, world, learner, prepared.samplers, state, writer,
                                   stop, progress)
            with progress:
                _train(training, optimizer, generators, data)
            results = meta_test(training)
    finally:
        if writer is not None:
            writer.close()
    return results


def _check_same_config(world: World, config: Config) -> None:
    """Raise on every process unless all were given rank 0's config (folders and device aside)."""
    if world.size == 1:
        return
    mine = _settings(config)
    main = distributed.on_main(world, _settings, config)
    differs = [key for key in main if main[key] != mine.get(key)]
    message = None
    if differs:
        key = differs[0]
        message = (f"process {world.rank} was given {key}={mine.get(key)!r} but rank 0 {main[key]!r}; "
                   f"start every process with the same options")
    if distributed.any_rank(world, message is not None):
        raise ConfigError(message or "another process was given other options than this one (its error says "
                                     "which); start every process with the same options")


def _settings(config: Config) -> dict[str, Any]:
    """``{"section.key": value}`` of the settings every process must share."""
    flat = {f"{section}.{key}": value for section, values in config_to_dict(config).items()
            if isinstance(values, dict) for key, value in values.items()}
    return {"preset": config.preset, **{k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES}}


def _train(run: TrainingRun, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator],
           data: dict[str, Any] | None) -> None:
    config, run_dir, world, learner, state, writer = (
        run.config, run.run_dir, run.world, run.learner, run.state, run.writer)
    meta, run_config = config.meta, config.run
    latest = run_dir / LATEST_NAME
    # This process's tasks of each meta-batch: all of them, or its slice under torchrun.
    first, last = distributed.task_range(meta.meta_batch_size, world)
    with step_guard(state.iteration + 1, latest):  # an absurd meta-batch fails here first
        my_tasks = torch.arange(first, last)
    keep = run_config.keep_best
    top = TopCheckpoints(run_dir, keep) if keep > 1 and world.is_main else None  # the K best, in top/

    def write_checkpoint() -> None:
        distributed.check_same_parameters(world, learner.meta_parameters(), state.iteration)
        check_finite(learner.meta_parameters(), state.iteration, latest)  # never save a diverged run
        if not world.is_main:
            return
        assert writer is not None
        save_checkpoint(
            {
                "format": FORMAT_VERSION,
                "iteration": state.iteration,
                **learner.weights(),
                "optimizer": optimizer.state_dict(),
                "rng": capture_rng_state(generators, run.device),
                "metrics": writer.offsets(),
                "progress": dataclasses.asdict(state),
                "config": config_to_dict(config),
                "versions": versions(),
                "data": data,  # data_fingerprint: what --resume must find again
            },
            latest,
        )

    while state.iteration < meta.iterations:
        iteration = state.iteration + 1
        lr = learning_rate(meta, iteration)
        start = time.perf_counter()
        cut_short = _not_saved(f"during iteration {iteration}", run)  # the message if a signal stops the step
        with step_guard(iteration, latest), run.stop.abortable(cut_short):
            episode = run.samplers["train"].sample(meta.meta_batch_size, generators["train"])  # all of it
            out, grad_sum = compute_meta_gradients(learner, episode.slice(first, last),
                                                   iteration_settings(meta, iteration),
                                                   multi_step_loss_weights(meta, iteration))
            scores = distributed.exchange_meta_gradient(world, learner.meta_parameters(), grad_sum,
                                                        meta.meta_batch_size,
                                                        torch.stack([out.task_losses, out.task_accs], dim=1),
                                                        my_tasks)
        task_losses, task_accs = scores.unbind(dim=1)
        loss = task_losses.mean().item()
        if not math.isfinite(loss):
            raise diverged(f"the meta-training loss is {loss}", iteration, latest)
        with step_guard(iteration, latest):
            grad_norm = gradient_norm(learner.meta_parameters())
            apply_meta_update(optimizer, lr)
        acc = task_accs.mean().item()
        seconds = time.perf_counter() - start
        state.iteration = iteration
        state.elapsed_s += seconds
        row = {"step": iteration, "split": "train", "loss": loss, "acc": acc, "sec_per_iter": seconds,
               "tasks_per_sec": meta.meta_batch_size / seconds, "lr": lr, "grad_norm": grad_norm,
               "peak_mem_mb": peak_memory_mb(run.device), **rate_values(learner.rates)}
        report_row(row, writer, run.progress)

        if iteration % run_config.eval_every == 0 or iteration == meta.iterations:
            start = time.perf_counter()
            cut_short = _not_saved(f"while validating iteration {iteration}", run)
            with step_guard(iteration, latest), run.stop.abortable(cut_short):
                losses, accs = score_tasks(config, learner, run.samplers["validation"], run_config.eval_tasks,
                                           task_generator(run_config.seed, "validation"), world=world)
            seconds = time.perf_counter() - start
            state.elapsed_s += seconds
            row = {"step": iteration, "split": "validation", "loss": losses.mean().item(),
                   "acc": accs.mean().item(), "acc_ci95": mean_ci95(accs)[1] if accs.numel() > 1 else None,
                   "tasks_per_sec": run_config.eval_tasks / seconds, "lr": lr}
            report_row(row, writer, run.progress)
            if not (math.isfinite(row["loss"]) and math.isfinite(row["acc"])):
                raise diverged(f"the validation loss is {row['loss']}", iteration, latest)
            improved = state.best_val_accuracy is None or row["acc"] > state.best_val_accuracy
            if improved or top is not None:
                check_finite(learner.meta_parameters(), iteration, latest)
                kept = {"format": FORMAT_VERSION, "iteration": iteration, "val_accuracy": row["acc"],
                        **learner.weights(), "config": config_to_dict(config)}
                if improved:
                    state.best_val_accuracy, state.best_iteration = row["acc"], iteration
                    if world.is_main:
                        save_checkpoint(kept, run_dir / BEST_NAME)
                if top is not None:  # run.keep_best > 1: the K best in top/ (rank 0 alone)
                    top.offer(row["acc"], iteration, kept)

        signum = run.stop.requested(world)
        if iteration % run_config.checkpoint_every == 0 or iteration == meta.iterations or signum is not None:
            write_checkpoint()
        if signum is not None:
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} received: stopped after iteration {iteration} and "
                f"saved {latest}; continue with: {resume_command(world, run_dir)}",
                signum,
            )


def _not_saved(where: str, run: TrainingRun) -> str:
    """How a phase cut short by a signal ends the run: nothing since the last checkpoint is kept."""
    return (f"{where}: stopped there, nothing since the last checkpoint is saved and "
            f"{saved_note(run.run_dir / LATEST_NAME)}; continue with: "
            f"{resume_command(run.world, run.run_dir)}")
