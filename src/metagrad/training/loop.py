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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import platform
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import metagrad
from metagrad import _openmp, algorithms
from metagrad.algorithms import MetaBatchOutput
from metagrad.data._io import write_text_atomically
from metagrad.data.datasets import FewShotDataset, load_dataset
from metagrad.data.episodes import EpisodeSampler
from metagrad.errors import (
    ConfigError,
    FileError,
    MetagradError,
    ResultNotSaved,
    TrainingError,
    describe_os_error,
)
from metagrad.functional import learned_rates
from metagrad.models import NORM_INIT_MODELS, build_model
from metagrad.training import distributed
from metagrad.training.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    load_checkpoint,
    previous_path,
    restore_rng_state,
    save_checkpoint,
)
from metagrad.training.config import (
    RESUMABLE_CHANGES,
    Config,
    DataConfig,
    MetaConfig,
    ModelConfig,
    _flatten,
    absolute_folders,
    check_resume_compatible,
    config_from_dict,
    config_to_dict,
    load_config_file,
    save_config,
)
from metagrad.training.distributed import ONE_PROCESS, World
from metagrad.training.metrics import CSV_NAME, JSONL_NAME, MetricsWriter, mean_ci95
from metagrad.training.progress import Progress
from metagrad.training.runlock import lock_run_dir
from metagrad.types import Buffers, LearningRate, Params, StepWeights

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; typing_extensions comes with torch

__all__ = [
    "TrainingInterrupted",
    "apply_meta_update",
    "compute_meta_gradients",
    "epoch_of",
    "evaluate_checkpoint",
    "inner_learning_rate",
    "inner_rates",
    "iteration_settings",
    "learning_rate",
    "meta_parameters",
    "multi_step_loss_weights",
    "resolve_device",
    "restore_rates",
    "run",
    "task_generator",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
RESULTS_NAME = "results.json"
CI95_FORMULA = "1.96 * sample std (ddof=1) / sqrt(n) over per-task accuracies"
RUN_FILES = frozenset({CONFIG_NAME, JSONL_NAME, CSV_NAME, LATEST_NAME, BEST_NAME, RESULTS_NAME,
                       previous_path(Path(LATEST_NAME)).name, previous_path(Path(BEST_NAME)).name,
                       "learning_curves.png"})
"""The files a run writes (besides ``eval_*.json``): a new run never overwrites them without ``overwrite``."""


class TrainingInterrupted(MetagradError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "ended by signal N"


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; other names are checked for availability.

    Raises:
        ConfigError: the requested device is not available on this machine.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    return device


def task_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one task stream (``"train"``, ``"validation"``, ``"test"``).

    Each purpose gets its own seed, a hash of ``(seed, purpose)``, so that the streams are independent
    and, e.g., changing ``eval_tasks`` does not change the training tasks.
    """
    digest = hashlib.sha256(f"metagrad/{seed}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def epoch_of(meta: MetaConfig, iteration: int) -> int:
    """The 0-based epoch of step ``iteration`` (1-based) when ``meta.iterations_per_epoch`` sets epochs,
    counted as MAML++'s code counts them (``experiment_builder.py``: completed iterations // iterations per
    epoch); 0 without epochs."""
    return (iteration - 1) // meta.iterations_per_epoch if meta.iterations_per_epoch else 0


def learning_rate(meta: MetaConfig, iteration: int) -> float:
    """The outer learning rate used by step ``iteration`` (1-based): constant, or cosine-annealed.

    The cosine schedule starts at ``meta_lr`` and decays towards ``min_meta_lr`` over ``iterations``
    steps, step by step; with epochs (``iterations_per_epoch``) it moves once per epoch, as MAML++'s code
    steps torch's ``CosineAnnealingLR(T_max=total_epochs, eta_min=min_learning_rate)`` with the epoch
    (``few_shot_learning_system.py``, ``run_train_iter``).
    """
    if meta.lr_schedule == "cosine":
        if meta.iterations_per_epoch:
            progress = epoch_of(meta, iteration) / (meta.iterations / meta.iterations_per_epoch)
        else:
            progress = (iteration - 1) / meta.iterations
        floor = meta.min_meta_lr
        return floor + (meta.meta_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return meta.meta_lr


def multi_step_loss_weights(meta: MetaConfig, iteration: int) -> list[float] | None:
    """MAML++'s multi-step loss weights for step ``iteration``, one per inner step; None once the
    ``msl_epochs`` are over (or without MSL): the last step's query loss alone.

    The schedule of the reference code (``few_shot_learning_system.py``,
    ``get_per_step_loss_importance_vector``): every step starts at ``1/n``; each epoch the first
    ``n - 1`` weights lose ``1/(n * msl_epochs)`` down to a floor of ``0.03/n`` while the last one gains
    what they lose, up to ``1 - (n - 1) * 0.03/n``, so the last step comes to dominate.
    """
    if not meta.msl_epochs or epoch_of(meta, iteration) >= meta.msl_epochs:
        return None
    n, epoch = meta.inner_steps, epoch_of(meta, iteration)
    decay, floor = 1.0 / n / meta.msl_epochs, 0.03 / n
    earlier = [max(1.0 / n - epoch * decay, floor)] * (n - 1)
    return [*earlier, min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)]


def iteration_settings(meta: MetaConfig, iteration: int) -> MetaConfig:
    """``meta`` as step ``iteration`` uses it: first order during MAML++'s DA epochs
    (``first_order_epochs``), the configured order after. MAML++'s code trains second order when
    ``epoch > first_order_to_second_order_epoch``; ``first_order_epochs`` is that setting plus one."""
    if meta.first_order_epochs and epoch_of(meta, iteration) < meta.first_order_epochs:
        return dataclasses.replace(meta, first_order=True)
    return meta


def compute_meta_gradients(
    model: nn.Module, params: Params, buffers: Buffers, episode: Any, meta: MetaConfig,
    rates: Params | None = None, step_weights: StepWeights = None,
) -> tuple[MetaBatchOutput, Tensor]:
    """Meta-gradient of a meta-batch (one process's share of it under torchrun), chunk by chunk.

    Args:
        model: the meta-learned model.
        params: its parameters, ``dict(model.named_parameters())``.
        buffers: its buffers, ``dict(model.named_buffers())``.
        episode: T training tasks (``metagrad.types.Episode``).
        meta: the algorithm and inner-loop settings.
        rates: the learned inner rates (``inner_rates``); empty or None: ``meta.inner_lr``.
        step_weights: MAML++'s multi-step loss weights of this iteration (``multi_step_loss_weights``).

    Returns:
        ``(out, grad_sum)``: the tasks' losses and accuracies (``out.loss`` is the mean query loss over
        the T tasks), and the gradient of the SUM of their query losses, flat (P + R,) float64 (the
        parameters', then the learned rates', as ``meta_parameters`` orders them).
        ``distributed.all_reduce_gradients`` turns it into every parameter's ``.grad``.
    """
    return algorithms.chunk_gradients(
        meta.algorithm, model, params, buffers, episode,
        inner_lr=inner_learning_rate(meta, rates or {}, meta.inner_steps), inner_steps=meta.inner_steps,
        first_order=meta.first_order, step_weights=step_weights,
        vectorize=meta.vectorize, max_tasks_per_chunk=meta.tasks_per_chunk or None,
    )


def inner_rates(meta: MetaConfig, params: Params, seed: int) -> Params:
    """The learned inner rates ``meta.learned_inner_lr`` asks for, as leaves that require grad, named as
    ``functional.learned_rates`` names them; empty for "none" (the inner loop uses ``meta.inner_lr``).

    "per-parameter" (Meta-SGD): a tensor of each parameter's shape, starting at ``meta.inner_lr`` or
    uniform in ``[meta.inner_lr_init_low, meta.inner_lr)``, drawn from a generator of its own (seeded
    like the task streams), so that the model's initialization and the tasks do not change.
    "per-layer-per-step" (MAML++'s LSLR): a scalar per parameter tensor and inner step
    (``"<step>.<name>"``), each starting at ``meta.inner_lr``.
    ``inner_learning_rate`` turns them into the ``inner_lr`` the algorithms take.
    """
    if meta.learned_inner_lr == "per-parameter":
        return algorithms.meta_sgd_rates(params, inner_lr=meta.inner_lr, low=meta.inner_lr_init_low,
                                         generator=task_generator(seed, "inner_lr"))
    if meta.learned_inner_lr == "per-layer-per-step":
        return learned_rates(algorithms.lslr_rates(params, inner_lr=meta.inner_lr, steps=meta.inner_steps))
    return {}


def inner_learning_rate(meta: MetaConfig, rates: Params, steps: int) -> LearningRate:
    """The ``inner_lr`` of an inner loop of ``steps`` steps: ``meta.inner_lr`` without learned rates,
    Meta-SGD's ``rates`` (the same for every step), or LSLR's per-step dicts. LSLR has rates for the
    ``meta.inner_steps`` steps of meta-training; test-time steps beyond them take the last step's rates.
    """
    if meta.learned_inner_lr == "per-layer-per-step":
        per_step: list[dict[str, Tensor]] = [{} for _ in range(meta.inner_steps)]
        for where, rate in rates.items():
            step, name = where.split(".", 1)
            per_step[int(step)][name] = rate
        return [per_step[min(step, meta.inner_steps - 1)] for step in range(steps)]
    return rates or meta.inner_lr


def meta_parameters(params: Params, rates: Params) -> Params:
    """Everything the outer loop optimizes: the model's parameters, then the learned rates
    (``inner_lr.<name>``), in the order of ``compute_meta_gradients``' flat gradient."""
    return {**params, **algorithms.meta_rates(rates)}


def restore_rates(rates: Params, checkpoint: dict[str, Any], path: Path) -> None:
    """Copy a checkpoint's learned inner rates (``"inner_lrs"``) into ``rates``.

    Raises:
        TrainingError: the checkpoint lacks rates ``rates`` has, has others, or of other shapes.
    """
    saved = checkpoint.get("inner_lrs", {})
    if not isinstance(saved, dict) or set(saved) != set(rates) or any(
            not isinstance(t, Tensor) or t.shape != rates[k].shape for k, t in saved.items()):
        raise TrainingError(f"{path} does not hold the learned inner rates that meta.learned_inner_lr asks "
                            "for: it comes from a run with other settings; restore that run's config.json")
    with torch.no_grad():
        for name, tensor in saved.items():
            rates[name].copy_(tensor)


def _saved_rates(rates: Params) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in rates.items()}


def apply_meta_update(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """One outer step with learning rate ``lr`` from the gradients in place, then clear them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _score_tasks(
    config: Config,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    sampler: EpisodeSampler,
    num_tasks: int,
    generator: torch.Generator,
    stop: _StopFlag | None = None,
    world: World = ONE_PROCESS,
    rates: Params | None = None,
) -> tuple[Tensor, Tensor]:
    """Adapt to ``num_tasks`` tasks with the test-time inner loop; per-task query losses and accuracies.

    Learned inner rates (``rates``, see ``inner_rates``) replace ``meta.inner_lr`` when given.

    Tasks are sampled and scored ``meta_batch_size`` at a time (to bound memory), so the tasks drawn
    from ``generator`` depend only on the seed, ``num_tasks`` and ``meta_batch_size``. With several
    processes, each samples every chunk and scores its own slice of it; the scores are gathered back
    in task order, so every process returns all ``num_tasks`` scores, as one process would.
    Scoring is ``algorithms.evaluate_with_losses`` (first-order inner loop, no outer graph).
    """
    meta = config.meta
    losses, accs, indices = [], [], []
    for start in range(0, num_tasks, meta.meta_batch_size):
        if stop is not None:
            stop.check(world)
        episode = sampler.sample(min(meta.meta_batch_size, num_tasks - start), generator)
        first, last = distributed.task_range(episode.num_tasks, world)
        if first == last:  # fewer tasks in this chunk than processes
            continue
        task_loss, task_acc = algorithms.evaluate_with_losses(
            meta.algorithm, model, params, buffers, episode.slice(first, last),
            inner_lr=inner_learning_rate(meta, rates or {}, meta.test_inner_steps),
            inner_steps=meta.test_inner_steps, vectorize=meta.vectorize,
        )
        losses.append(task_loss.float().cpu())
        accs.append(task_acc.float().cpu())
        indices.append(torch.arange(start + first, start + last))
    if not indices:  # more processes than tasks: this one scored none
        losses, accs, indices = [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    scores = torch.stack([torch.cat(losses), torch.cat(accs)], dim=1)  # (tasks here, 2): loss, accuracy
    scores = distributed.gather_tasks(world, scores, torch.cat(indices), num_tasks)  # (num_tasks, 2)
    return scores[:, 0], scores[:, 1]


def _load_splits(data: DataConfig, splits: tuple[str, ...]) -> dict[str, FewShotDataset]:
    options: dict[str, Any] = {"split_scheme": data.split_scheme}
    if data.dataset == "omniglot":
        options["rotations"] = data.rotations
    if data.folder is not None:
        options["folder"] = data.folder
    return {
        split: load_dataset(data.dataset, split, data_dir=data.data_dir, cache_dir=data.cache_dir, **options)
        for split in splits
    }


def _build_model(model_config: ModelConfig, ways: int, image_shape: tuple[int, int, int]) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if model_config.name == "omniglot-fc":
        kwargs["input_size"] = math.prod(image_shape)
    else:
        kwargs["hidden_size"] = model_config.hidden_size
    if model_config.name == "omniglot-cnn":
        kwargs["strided"] = model_config.strided
    if model_config.name in NORM_INIT_MODELS:
        kwargs["norm_init"] = model_config.norm_init
    try:
        return build_model(model_config.name, ways, **kwargs)
    except (RuntimeError, MemoryError) as exc:
        if not _out_of_memory(exc):
            raise
        raise ConfigError(f"the model ({model_config.name}, {ways} ways, hidden_size "
                          f"{model_config.hidden_size}) does not fit in memory; choose a smaller "
                          "model.hidden_size or data.ways") from None


def _versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "metagrad": metagrad.__version__}


def _warn_if_spinning(device: torch.device) -> None:
    warning = _openmp.spinning_warning(device.type, torch.get_num_threads())
    if warning is not None:
        logger.warning(warning)


def _write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a result as JSON atomically; on failure raise :class:`ResultNotSaved` holding ``result``."""
    try:
        write_text_atomically(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise ResultNotSaved(describe_os_error(exc, "write", path) + "; the result is printed above, "
                             "and the earlier file, if any, is unchanged", result) from None


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations.

    The first signal sets the flag and restores the previous handlers, so a second Ctrl-C interrupts
    at once (without a final checkpoint). Handlers are installed only in the main thread.

    With ``keep_handlers`` (under torchrun) later signals are absorbed too: a Ctrl-C reaches each
    process twice, from the terminal and again from torchrun, and torchrun itself kills processes
    that do not stop within its own timeout.
    """

    def __init__(self, *, keep_handlers: bool = False) -> None:
        self.signum: int | None = None
        self._keep_handlers = keep_handlers
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        if not self._keep_handlers:
            self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self, world: World = ONE_PROCESS) -> int | None:
        """The signal that asks to stop, or None; under torchrun, the same answer in every process.

        A signal can reach the processes at different moments: they agree first, so that all stop
        at the same point (one that has not seen it yet reports SIGTERM).
        """
        if distributed.any_rank(world, self.signum is not None):
            return self.signum or signal.SIGTERM
        return None

    def check(self, world: World = ONE_PROCESS) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived (for phases with nothing to save)."""
        signum = self.requested(world)
        if signum is not None:
            raise TrainingInterrupted(f"{signal.Signals(signum).name} received", signum)


@dataclasses.dataclass
class _RunState:
    """What a checkpoint records about the run besides tensors."""

    iteration: int = 0
    best_val_accuracy: float | None = None
    best_iteration: int | None = None
    elapsed_s: float = 0.0  # wall time of the iterations done so far, over every resume


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------


def _default_run_dir(preset: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{preset}-{stamp}"
    suffix = 1
    while path.exists():  # two runs started in the same second
        path = Path("runs") / f"{preset}-{stamp}-{suffix}"
        suffix += 1
    return path


def _run_dir_of(config: Config, resume: bool) -> Path:
    """The run folder ``config`` names (or a new default one); checks only that it can be a folder."""
    if resume and config.run.run_dir is None:
        raise ConfigError("--resume needs the run folder: metagrad train --resume --run-dir DIR")
    run_dir = Path(config.run.run_dir) if config.run.run_dir is not None else _default_run_dir(config.preset)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder")
    return run_dir


def _run_files(run_dir: Path) -> list[str]:
    """The names of the files in ``run_dir`` that a run writes (config, metrics, checkpoints, results)."""
    return sorted(p.name for p in run_dir.glob("*") if p.name in RUN_FILES or p.match("eval_*.json"))


def _check_run_dir(run_dir: Path, config: Config, resume: bool, overwrite: bool) -> None:
    """Check that ``run_dir`` suits ``resume`` (it holds a run) or a new run (it holds none, or
    ``overwrite``); nothing is written yet."""
    if resume:
        if overwrite:
            raise ConfigError("--resume continues the run in --run-dir, --overwrite replaces it: choose one")
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(
                f"no run to resume in {run_dir} (it holds no {CONFIG_NAME}); "
                f"start a new run with: metagrad train --run-dir {run_dir}"
            )
        saved = config_from_dict(load_config_file(run_dir / CONFIG_NAME), source=str(run_dir / CONFIG_NAME))
        check_resume_compatible(saved, config)
        return
    found = _run_files(run_dir)
    if found and not overwrite:
        what = ("a run" if CONFIG_NAME in found
                else f"files of a run ({', '.join(found)}) but no {CONFIG_NAME}")
        raise ConfigError(
            f"{run_dir} already holds {what}; continue it with --resume, replace it with --overwrite, "
            "or pass another --run-dir"
        )


def _create_run_dir(config: Config, run_dir: Path) -> None:
    """Write the new run's config.json, after removing an earlier run's files (``--overwrite``)."""
    for name in _run_files(run_dir):
        try:
            (run_dir / name).unlink()
        except OSError as exc:
            raise FileError(describe_os_error(exc, "remove the earlier run's file", run_dir / name)) from None
    save_config(config, run_dir / CONFIG_NAME)


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
    with distributed.process_group(world, device, config.run.dist_timeout_s), contextlib.ExitStack() as lock:

        def claim_run_dir() -> Path:  # rank 0 locks the folder for the whole run, then checks it
            run_dir = _run_dir_of(config, resume)
            lock.enter_context(lock_run_dir(run_dir, "train"))
            _check_run_dir(run_dir, config, resume, overwrite)
            return run_dir

        _check_same_config(world, config)
        run_dir = distributed.on_main(world, claim_run_dir)
        try:
            return _run(config, world, device, run_dir, resume=resume, quiet=quiet)
        except FileError as exc:
            if isinstance(exc, ResultNotSaved) or not (run_dir / CONFIG_NAME).is_file():
                raise
            raise FileError(f"{exc}; the last checkpoint and metrics are intact: once that is fixed, "
                            f"continue with: {_resume_command(world, run_dir)}") from None


def _run(config: Config, world: World, device: torch.device, run_dir: Path, *, resume: bool,
         quiet: bool) -> dict[str, Any]:
    data, meta = config.data, config.meta
    # Data first: a missing dataset or an impossible task shape fails before anything is written (the
    # locked folder, if this run created it, is removed again).
    with distributed.local_main_first(world):  # one process per node downloads and decodes
        datasets = _load_splits(data, ("train", "validation", "test"))
    samplers = {
        split: EpisodeSampler(dataset, data.ways, data.shots, data.query_shots, device=device)
        for split, dataset in datasets.items()
    }
    torch.manual_seed(config.run.seed)  # the model's initialization (the same in every process)
    model = _build_model(config.model, data.ways, datasets["train"].image_shape).to(device)
    if not resume:
        distributed.on_main(world, _create_run_dir, config, run_dir)
    if world.is_main:
        where = f"{world.size} processes on {device.type}" if world.size > 1 else f"device {device}"
        if device.type == "cpu":
            where += f", {torch.get_num_threads()} thread(s)" + (" each" if world.size > 1 else "")
        logger.info("run folder %s, %s", run_dir, where)
        _warn_if_spinning(device)

    params: Params = dict(model.named_parameters())
    buffers: Buffers = dict(model.named_buffers())
    rates = inner_rates(meta, params, config.run.seed)  # Meta-SGD's learned rates; empty for MAML
    optimizer = torch.optim.Adam(meta_parameters(params, rates).values(), lr=meta.meta_lr)
    generators = {"train": task_generator(config.run.seed, "train")}
    state = _RunState()
    offsets = None

    # Rank 0 reads the checkpoint and hands it to every process: all restore the same random states,
    # since each samples the whole meta-batch.
    checkpoint = distributed.on_main(world, load_checkpoint, run_dir / LATEST_NAME) if resume else None
    if checkpoint is not None:
        restore_params(params, checkpoint, run_dir / LATEST_NAME, config)
        restore_rates(rates, checkpoint, run_dir / LATEST_NAME)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            restore_rng_state(checkpoint["rng"], generators, device)
            state = _RunState(**checkpoint["progress"])
            offsets = {name: int(checkpoint["metrics"][name]) for name in ("jsonl", "csv")}
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a checkpoint made by other means
            raise TrainingError(f"{run_dir / LATEST_NAME} is not a complete metagrad checkpoint "
                                f"({type(exc).__name__}: {exc}); start a new run, or restore the file"
                                ) from None
        if world.is_main:
            logger.info("resuming %s from iteration %d", run_dir, state.iteration)
    elif resume and world.is_main:
        logger.warning("%s holds no checkpoint yet: starting its run from iteration 0", run_dir)
    distributed.check_same_parameters(world, meta_parameters(params, rates), state.iteration)

    writer = MetricsWriter(run_dir, offsets) if world.is_main else None  # rank 0 alone writes files
    try:
        with _StopFlag(keep_handlers=world.size > 1) as stop:
            progress = Progress(meta.iterations, state.iteration, config.run.log_every,
                                enabled=not quiet and world.is_main)
            with progress:
                _train(config, run_dir, device, model, params, buffers, optimizer, generators, samplers,
                       state, writer, stop, progress, world, rates)
            results = _meta_test(config, run_dir, device, model, params, buffers, samplers["test"], state,
                                 writer, stop, progress, world, rates)
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


def _report(row: dict[str, Any], writer: MetricsWriter | None, progress: Progress) -> None:
    """Write a metric row to the run folder (rank 0: ``writer`` is None elsewhere) and show it."""
    if writer is not None:
        writer.write(row)
    progress.row(row)


def _train(
    config: Config,
    run_dir: Path,
    device: torch.device,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    samplers: dict[str, EpisodeSampler],
    state: _RunState,
    writer: MetricsWriter | None,
    stop: _StopFlag,
    progress: Progress,
    world: World,
    rates: Params,
) -> None:
    meta, run_config = config.meta, config.run
    latest = run_dir / LATEST_NAME
    # This process's tasks of each meta-batch: all of them, or its slice under torchrun.
    first, last = distributed.task_range(meta.meta_batch_size, world)
    with _step_guard(state.iteration + 1, latest):  # an absurd meta-batch fails here first
        my_tasks = torch.arange(first, last)

    def write_checkpoint() -> None:
        distributed.check_same_parameters(world, meta_parameters(params, rates), state.iteration)
        _check_finite(meta_parameters(params, rates), state.iteration, latest)  # never save a diverged run
        if not world.is_main:
            return
        assert writer is not None
        save_checkpoint(
            {
                "format": FORMAT_VERSION,
                "iteration": state.iteration,
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "inner_lrs": _saved_rates(rates),
                "optimizer": optimizer.state_dict(),
                "rng": capture_rng_state(generators, device),
                "metrics": writer.offsets(),
                "progress": dataclasses.asdict(state),
                "config": config_to_dict(config),
                "versions": _versions(),
            },
            latest,
        )

    while state.iteration < meta.iterations:
        iteration = state.iteration + 1
        lr = learning_rate(meta, iteration)
        start = time.perf_counter()
        with _step_guard(iteration, latest):
            episode = samplers["train"].sample(meta.meta_batch_size, generators["train"])  # each process: all
            out, grad_sum = compute_meta_gradients(model, params, buffers, episode.slice(first, last),
                                                   iteration_settings(meta, iteration), rates,
                                                   multi_step_loss_weights(meta, iteration))
            scores = distributed.exchange_meta_gradient(world, meta_parameters(params, rates), grad_sum,
                                                        meta.meta_batch_size,
                                                        torch.stack([out.task_losses, out.task_accs], dim=1),
                                                        my_tasks)
        task_losses, task_accs = scores.unbind(dim=1)
        loss = task_losses.mean().item()
        if not math.isfinite(loss):
            raise _diverged(f"the meta-training loss is {loss}", iteration, latest)
        with _step_guard(iteration, latest):
            apply_meta_update(optimizer, lr)
        acc = task_accs.mean().item()
        seconds = time.perf_counter() - start
        state.iteration = iteration
        state.elapsed_s += seconds
        row = {"step": iteration, "split": "train", "loss": loss, "acc": acc, "sec_per_iter": seconds,
               "tasks_per_sec": meta.meta_batch_size / seconds, "lr": lr}
        _report(row, writer, progress)

        if iteration % run_config.eval_every == 0 or iteration == meta.iterations:
            start = time.perf_counter()
            with _step_guard(iteration, latest):
                losses, accs = _score_tasks(config, model, params, buffers, samplers["validation"],
                                            run_config.eval_tasks,
                                            task_generator(run_config.seed, "validation"), world=world,
                                            rates=rates)
            seconds = time.perf_counter() - start
            state.elapsed_s += seconds
            row = {"step": iteration, "split": "validation", "loss": losses.mean().item(),
                   "acc": accs.mean().item(), "tasks_per_sec": run_config.eval_tasks / seconds, "lr": lr}
            _report(row, writer, progress)
            if not (math.isfinite(row["loss"]) and math.isfinite(row["acc"])):
                raise _diverged(f"the validation loss is {row['loss']}", iteration, latest)
            if state.best_val_accuracy is None or row["acc"] > state.best_val_accuracy:
                state.best_val_accuracy, state.best_iteration = row["acc"], iteration
                _check_finite(meta_parameters(params, rates), iteration, latest)
                if world.is_main:
                    save_checkpoint(
                        {"format": FORMAT_VERSION, "iteration": iteration, "val_accuracy": row["acc"],
                         "params": {k: v.detach().cpu() for k, v in params.items()},
                         "inner_lrs": _saved_rates(rates),
                         "config": config_to_dict(config)},
                        run_dir / BEST_NAME,
                    )

        signum = stop.requested(world)
        if iteration % run_config.checkpoint_every == 0 or iteration == meta.iterations or signum is not None:
            write_checkpoint()
        if signum is not None:
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} received: stopped after iteration {iteration} and "
                f"saved {latest}; continue with: {_resume_command(world, run_dir)}",
                signum,
            )


def _saved_note(latest: Path) -> str:
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was written yet"


def _diverged(what: str, iteration: int, latest: Path) -> TrainingError:
    return TrainingError(
        f"{what} at iteration {iteration}: training stopped before that update, {_saved_note(latest)}; "
        "try a smaller --meta-lr or --inner-lr"
    )


@contextlib.contextmanager
def _step_guard(iteration: int, latest: Path) -> Iterator[None]:
    """One message for what absurd settings make a step hit: a number too large for its type (torch's
    "cannot be converted ... without overflow", e.g. Adam with a huge learning rate) stops as a NaN loss
    does; running out of memory names the settings that size a step."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)
        if _out_of_memory(exc):
            raise TrainingError(
                f"out of memory at iteration {iteration} ({reason}); {_saved_note(latest)}. Lower "
                "--meta-batch-size, --tasks-per-chunk or --eval-tasks (or the model's size), or free memory"
            ) from None
        if "overflow" not in reason:
            raise
        raise _diverged(f"a value overflowed ({reason})", iteration, latest) from None


def _out_of_memory(exc: BaseException) -> bool:
    """True for the allocators' failures: Python's MemoryError, torch's CPU and CUDA out-of-memory errors."""
    text = str(exc)
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def _check_finite(params: Params, iteration: int, latest: Path) -> None:
    """Refuse to go on (and so to save) with a NaN or infinite parameter."""
    bad = [name for name, tensor in params.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise _diverged(f"parameter {bad[0]} is not finite", iteration, latest)


MODEL_SETTINGS = ("data.dataset", "data.ways", "data.rotations", "model.name", "model.hidden_size",
                  "model.strided", "model.norm_init")
"""The settings a checkpoint's parameters depend on: a checkpoint fits only a config that agrees on them."""


def restore_params(params: Params, checkpoint: dict[str, Any], path: Path, config: Config) -> None:
    """Copy a checkpoint's parameters into ``params``, after checking that they belong to this model.

    Raises:
        ConfigError: the checkpoint was trained with other :data:`MODEL_SETTINGS` than ``config``, or a
            parameter is missing, unknown or of another shape (the message names it).
        TrainingError: the checkpoint holds no parameters, or NaN or infinite ones.
    """
    where = path.parent / CONFIG_NAME
    check_model_settings(checkpoint, path, config)
    saved = checkpoint.get("params")
    if not isinstance(saved, dict) or not all(isinstance(t, Tensor) for t in saved.values()):
        raise TrainingError(f"{path} holds no parameters: it is damaged or not a metagrad checkpoint")
    unknown, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
    if unknown or missing:
        what = (f"has a parameter {unknown[0]!r} that the model of {where} lacks" if unknown
                else f"lacks the parameter {missing[0]!r} of the model of {where}")
        raise ConfigError(f"{path} {what} ({config.model.name}): the checkpoint comes from another model; "
                          "restore the run's config.json or use another checkpoint")
    for name, tensor in saved.items():
        if tensor.shape != params[name].shape:
            raise ConfigError(
                f"{path} does not fit the model of {where}: parameter {name} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(params[name].shape)} with "
                f"data.ways={config.data.ways}, "
                f"model.hidden_size={config.model.hidden_size}; restore the settings it was trained with"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise TrainingError(f"{path} holds NaN or infinite values in {name}: it comes from a diverged "
                                "run; use another checkpoint")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def check_model_settings(checkpoint: dict[str, Any], path: Path, config: Config) -> None:
    """Raise ConfigError naming the first of :data:`MODEL_SETTINGS` in which the config the checkpoint
    was trained with (when it records one) differs from ``config``."""
    saved_config = checkpoint.get("config")
    if not isinstance(saved_config, dict):
        return  # best.pt before it recorded its config: restore_params checks the shapes
    where = path.parent / CONFIG_NAME
    ours, theirs = _flatten(config_to_dict(config)), _flatten(saved_config)
    for key in MODEL_SETTINGS:
        if key in theirs and theirs[key] != ours[key]:
            raise ConfigError(
                f"{path} was trained with {key}={theirs[key]!r} but {where} says {ours[key]!r}: they do not "
                f"fit together; restore {key} in {where} (or use the checkpoint of that run)"
            )


def _resume_command(world: World, run_dir: Path) -> str:
    launcher = "torchrun <the same options> -m metagrad" if world.size > 1 else "metagrad"
    return f"{launcher} train --resume --run-dir {run_dir}"


def _meta_test(
    config: Config,
    run_dir: Path,
    device: torch.device,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    sampler: EpisodeSampler,
    state: _RunState,
    writer: MetricsWriter | None,
    stop: _StopFlag,
    progress: Progress,
    world: World,
    rates: Params,
) -> dict[str, Any]:
    best = distributed.on_main(world, load_checkpoint, run_dir / BEST_NAME)
    checkpoint_name = "latest"
    if best is not None:
        checkpoint_name = "best"
        restore_params(params, best, run_dir / BEST_NAME, config)
        restore_rates(rates, best, run_dir / BEST_NAME)
    if world.is_main:
        logger.info("meta-testing %s.pt (iteration %s) on %d tasks with %d inner steps", checkpoint_name,
                    best["iteration"] if best is not None else state.iteration, config.run.test_tasks,
                    config.meta.test_inner_steps)
    start = time.perf_counter()
    try:
        test = _test(config, model, params, buffers, sampler, config.run.test_tasks, stop, world, rates)
    except TrainingInterrupted as exc:
        raise TrainingInterrupted(
            f"{exc} during the meta-test; training is complete and saved: "
            f"{_resume_command(world, run_dir)} runs the meta-test again", exc.exit_code - 128
        ) from None
    seconds = time.perf_counter() - start
    # The test row's step is the iteration of the parameters tested (best.pt's), not the last one.
    tested_iteration = best["iteration"] if best is not None else state.iteration
    row = {"step": tested_iteration, "split": "test", "loss": test["test_loss"], "acc": test["test_accuracy"],
           "tasks_per_sec": config.run.test_tasks / seconds}
    _report(row, writer, progress)
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
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),  # per process; the CPU's share of the wall time
        "processes": world.size,
        "seed": config.run.seed,
        "versions": _versions(),
        "run_dir": str(run_dir),
    }
    if world.is_main:
        _write_result(run_dir / RESULTS_NAME, results)
    logger.debug("test accuracy %.2f%% +/- %.2f%% over %d tasks; results in %s", 100 * test["test_accuracy"],
                 100 * test["test_ci95"], test["test_tasks"], run_dir / RESULTS_NAME)
    return results


def _test(
    config: Config,
    model: nn.Module,
    params: Params,
    buffers: Buffers,
    sampler: EpisodeSampler,
    num_tasks: int,
    stop: _StopFlag | None = None,
    world: World = ONE_PROCESS,
    rates: Params | None = None,
) -> dict[str, Any]:
    losses, accs = _score_tasks(config, model, params, buffers, sampler, num_tasks,
                                task_generator(config.run.seed, "test"), stop, world, rates)
    accuracy, ci95 = mean_ci95(accs)
    return {
        "test_accuracy": accuracy,
        "test_ci95": ci95,
        "test_loss": losses.double().mean().item(),
        "test_tasks": num_tasks,
        "test_inner_steps": config.meta.test_inner_steps,
        "ci95_formula": CI95_FORMULA,
    }


# --------------------------------------------------------------------------------------------------
# evaluate_checkpoint
# --------------------------------------------------------------------------------------------------


def _training_progress(run_dir: Path, config: Config, latest: dict[str, Any] | None) -> dict[str, Any]:
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
    config = absolute_folders(config_from_dict(config_to_dict(config), source="eval options"))  # checks them
    with lock_run_dir(run_dir, "eval", create=False):
        return _evaluate(run_dir, checkpoint, config)


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
    _warn_if_spinning(torch_device)
    dataset = _load_splits(config.data, ("test",))["test"]
    data = config.data
    sampler = EpisodeSampler(dataset, data.ways, data.shots, data.query_shots, device=torch_device)
    model = _build_model(config.model, data.ways, dataset.image_shape).to(torch_device)
    params = dict(model.named_parameters())
    restore_params(params, state, path, config)
    rates = inner_rates(config.meta, params, config.run.seed)
    restore_rates(rates, state, path)
    start = time.perf_counter()
    with _StopFlag() as stop, _step_guard(state.get("iteration", 0), path):
        test = _test(config, model, params, dict(model.named_buffers()), sampler, config.run.test_tasks, stop,
                     rates=rates)
    evaluation = {
        "preset": config.preset,
        "checkpoint": checkpoint,
        "checkpoint_iteration": state.get("iteration"),
        **test,
        "wall_time_s": time.perf_counter() - start,
        "device": str(torch_device),
        "cpu_threads": torch.get_num_threads(),
        "versions": _versions(),
        **_training_progress(run_dir, config, state if checkpoint == "latest" else None),
    }
    _write_result(run_dir / f"eval_{checkpoint}.json", evaluation)
    return evaluation
