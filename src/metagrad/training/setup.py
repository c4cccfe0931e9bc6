"""What a run and an evaluation start from: the device, the data, the learner.

:func:`prepare` is the one setup that :func:`metagrad.training.loop.run`,
:func:`metagrad.training.evaluation.evaluate_checkpoint` and the ensemble evaluation use: it loads the
splits, makes their task samplers and builds the :class:`Learner` (the model, its parameters as the run
meta-learns them, :func:`meta_learned_params`, and the learned inner rates). A training run then holds
everything its loop and its meta-test share in one :class:`TrainingRun`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

import metagrad
from metagrad import _openmp, algorithms
from metagrad.algorithms import Algorithm
from metagrad.data.datasets import FewShotDataset, load_dataset
from metagrad.data.episodes import EpisodeSampler
from metagrad.errors import ConfigError
from metagrad.models import IMAGE_SIZE_MODELS, NORM_INIT_MODELS, build_model
from metagrad.per_step import per_step_bn_params
from metagrad.training import distributed
from metagrad.training.checkpoint import RunState, restore_params
from metagrad.training.config import Config, DataConfig, MetaConfig, ModelConfig, algorithm_settings
from metagrad.training.distributed import ONE_PROCESS, World
from metagrad.training.failures import check_memory, memory_per_task, out_of_memory
from metagrad.training.metrics import MetricsWriter
from metagrad.training.progress import Progress
from metagrad.training.rates import (
    inner_learning_rate,
    inner_rates,
    meta_parameters,
    restore_rates,
    saved_rates,
)
from metagrad.training.signals import StopFlag
from metagrad.types import Buffers, Params, StepWeights

__all__ = [
    "Learner",
    "Prepared",
    "TrainingRun",
    "check_input_shape",
    "load_splits",
    "make_model",
    "meta_learned_params",
    "prepare",
    "resolve_device",
    "versions",
    "warn_if_spinning",
]

logger = logging.getLogger(__name__)


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


def load_splits(data: DataConfig, splits: tuple[str, ...]) -> dict[str, FewShotDataset]:
    options: dict[str, Any] = {"split_scheme": data.split_scheme}
    if data.dataset == "omniglot":
        options["rotations"] = data.rotations
    if data.folder is not None:
        options["folder"] = data.folder
    return {
        split: load_dataset(data.dataset, split, data_dir=data.data_dir, cache_dir=data.cache_dir, **options)
        for split in splits
    }


def make_model(model_config: ModelConfig, ways: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """The configured network, its input layer fitted to ``image_shape`` (C, H, W): any of the networks
    runs on any dataset's images (your own grayscale or color folder with any preset)."""
    kwargs: dict[str, Any] = {}
    if model_config.name == "omniglot-fc":
        kwargs["input_size"] = math.prod(image_shape)
    else:
        kwargs["hidden_size"] = model_config.hidden_size
        kwargs["channels"] = image_shape[0]
    if model_config.name == "omniglot-cnn":
        kwargs["strided"] = model_config.strided
    if model_config.name == "mini-imagenet-cnn":
        kwargs["image_size"] = image_shape[1]
    if model_config.name in NORM_INIT_MODELS:
        kwargs["norm_init"] = model_config.norm_init
    if model_config.name in IMAGE_SIZE_MODELS:  # the head's input size follows the data's image side
        kwargs["image_size"] = image_shape[-1]
    try:
        return build_model(model_config.name, ways, **kwargs)
    except (RuntimeError, MemoryError) as exc:
        if not out_of_memory(exc):
            raise
        raise ConfigError(f"the model ({model_config.name}, {ways} ways, hidden_size "
                          f"{model_config.hidden_size}) does not fit in memory; choose a smaller "
                          "model.hidden_size or data.ways") from None


def versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "metagrad": metagrad.__version__}


def warn_if_spinning(device: torch.device) -> None:
    warning = _openmp.spinning_warning(device.type, torch.get_num_threads())
    if warning is not None:
        logger.warning(warning)


@dataclasses.dataclass
class Learner:
    """What a run meta-learns, as training and evaluation hold it.

    Attributes:
        model: the network.
        params: its parameters as the run meta-learns them (``meta_learned_params``: with MAML++'s
            per-step BatchNorm copies when asked).
        buffers: its buffers.
        rates: the learned inner rates (``rates.inner_rates``: Meta-SGD's, LSLR's; empty for MAML).
    """

    model: nn.Module
    params: Params
    buffers: Buffers
    rates: Params

    def meta_parameters(self) -> Params:
        """Everything the outer loop optimizes: the parameters, then the learned rates."""
        return meta_parameters(self.params, self.rates)

    def algorithm(self, meta: MetaConfig, *, test: bool = False,
                  step_weights: StepWeights = None) -> Algorithm:
        """The algorithm ``meta`` names, with this learner's inner rates (``rates.inner_learning_rate``):
        for a training step (``meta`` as ``schedule.iteration_settings`` gives it, with the step's
        multi-step loss weights) or, with ``test``, for validation and meta-testing (``test_inner_steps``)."""
        steps = meta.test_inner_steps if test else meta.inner_steps
        return algorithms.make(meta.algorithm, inner_lr=inner_learning_rate(meta, self.rates, steps),
                               inner_steps=steps, first_order=meta.first_order and not test,
                               step_weights=None if test else step_weights, **algorithm_settings(meta))

    def optimizer(self, meta: MetaConfig) -> torch.optim.Optimizer:
        """The outer optimizer over the meta-parameters: Adam, or plain SGD for an algorithm whose
        meta-gradient is a parameter difference (Reptile's ``outer_optimizer``)."""
        if algorithms.ALGORITHMS[meta.algorithm].outer_optimizer == "sgd":
            return torch.optim.SGD(self.meta_parameters().values(), lr=meta.meta_lr)
        return torch.optim.Adam(self.meta_parameters().values(), lr=meta.meta_lr)

    def weights(self) -> dict[str, Any]:
        """The checkpoint entries of what is learned: ``params`` and ``inner_lrs``, detached, on the CPU."""
        return {"params": {k: v.detach().cpu() for k, v in self.params.items()},
                "inner_lrs": saved_rates(self.rates)}

    def restore(self, checkpoint: dict[str, Any], path: Path, config: Config) -> None:
        """Copy a checkpoint's parameters and learned rates in, after checking that they fit
        (``checkpoint.restore_params``, ``rates.restore_rates``)."""
        restore_params(self.params, checkpoint, path, config)
        restore_rates(self.rates, checkpoint, path)


@dataclasses.dataclass
class Prepared:
    """What training and evaluation both start from: a sampler per split and the learner."""

    samplers: dict[str, EpisodeSampler]
    learner: Learner


@dataclasses.dataclass
class TrainingRun:
    """A training run in progress: what its loop (``loop._train``) and its meta-test
    (``evaluation.meta_test``) share. ``writer`` is None on the processes other than rank 0."""

    config: Config
    run_dir: Path
    device: torch.device
    world: World
    learner: Learner
    samplers: dict[str, EpisodeSampler]
    state: RunState
    writer: MetricsWriter | None
    stop: StopFlag
    progress: Progress


def prepare(config: Config, device: torch.device, splits: tuple[str, ...], *, init_seed: int | None,
            world: World = ONE_PROCESS) -> Prepared:
    """Load ``splits`` (one process per node first, see ``distributed.local_main_first``), make a task
    sampler for each, and build the learner on ``device`` for the first split's image shape.

    ``init_seed`` seeds torch before the model is built (training: the model's initialization, the same
    in every process); None leaves torch's generator alone (evaluation restores the parameters). The
    learned inner rates start as ``config.run.seed`` draws them.
    Data comes first: a missing dataset or an impossible task shape fails before anything is written.
    """
    data = config.data
    with distributed.local_main_first(world):  # one process per node downloads and decodes
        datasets = load_splits(data, splits)
    samplers = {
        split: EpisodeSampler(dataset, data.ways, data.train_shots if split == "train" and data.train_shots
                              else data.shots, data.query_shots, device=device)
        for split, dataset in datasets.items()
    }
    if init_seed is not None:
        torch.manual_seed(init_seed)
    image_shape = datasets[splits[0]].image_shape
    model = make_model(config.model, data.ways, image_shape).to(device)
    check_input_shape(model, image_shape, config, device)
    _check_memory(config, datasets, model, device)
    params = meta_learned_params(model, config.meta)
    rates = inner_rates(config.meta, params, config.run.seed)
    return Prepared(samplers, Learner(model, params, dict(model.named_buffers()), rates))


def _check_memory(config: Config, datasets: dict[str, FewShotDataset], model: nn.Module,
                  device: torch.device) -> None:
    """Refuse a meta-batch (training) or chunk of evaluation tasks that cannot fit in memory, before
    anything is allocated for it (``failures.check_memory``)."""
    data, meta, run = config.data, config.meta, config.run
    for split, dataset in datasets.items():
        training = split == "train"
        tasks = meta.meta_batch_size if training else \
            min(meta.meta_batch_size, run.eval_tasks if split == "validation" else run.test_tasks)
        per_task = memory_per_task(model, dataset.image_shape, num_classes=dataset.num_classes,
                                   per_class=dataset.images_per_class, ways=data.ways,
                                   samples=data.shots + data.query_shots)
        what = "meta.meta_batch_size (--meta-batch-size)" if training else f"a chunk of {split} tasks"
        check_memory(what, tasks, per_task, device, "lower --meta-batch-size (tasks sampled at once)")


def check_input_shape(model: nn.Module, image_shape: tuple[int, int, int], config: Config,
                      device: torch.device) -> None:
    """Run ``model`` once on two blank images of the data's shape: a network that cannot take them
    (another number of channels, too small an image) fails here, as one ConfigError, before any run file
    is written, instead of as torch's traceback in the first step.

    Raises:
        ConfigError: naming the data's image shape, the network and torch's reason.
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    expected = getattr(first, "in_channels", None)
    try:
        with torch.no_grad():  # metagrad's networks hold no buffers: this changes nothing in the model
            model(torch.zeros(2, *image_shape, device=device))
    except RuntimeError as exc:
        if out_of_memory(exc):
            raise
        c, h, w = image_shape
        data = config.data.folder or config.data.dataset
        takes = f" (its first layer takes {expected}-channel images)" if expected not in (None, c) else ""
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)
        raise ConfigError(f"the network {config.model.name}{takes} cannot take {data}'s {c}x{h}x{w} images: "
                          f"{reason}. Choose a model.name or preset made for such images") from None


def meta_learned_params(model: nn.Module, meta: MetaConfig) -> Params:
    """The model's parameters as the run meta-learns them: ``dict(model.named_parameters())``, with
    MAML++'s per-step copies of each BatchNorm weight and bias in their place when ``meta.per_step_bn``
    (``metagrad.per_step``; the checkpoints, the optimizer and the inner loop all take this dict)."""
    params = dict(model.named_parameters())
    return per_step_bn_params(model, params, steps=meta.inner_steps) if meta.per_step_bn else params
