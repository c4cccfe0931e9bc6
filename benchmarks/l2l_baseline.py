"""learn2learn 0.2.0 baseline: times its MAML ``clone()``/``adapt()`` loop the way its vision examples do.

Runs inside the virtual environment made by ``setup_peers.sh`` (torch, numpy, scipy and learn2learn;
no metagrad). learn2learn's package ``__init__`` imports torchvision, gym and more, which are not installed
there (torchvision does not import beside this torch), so :func:`import_learn2learn` loads only
``learn2learn.algorithms.maml``, ``learn2learn.utils``, ``learn2learn.nn`` and
``learn2learn.vision.models.cnn4`` under empty stand-in parent packages.

The timed step follows ``examples/vision/maml_omniglot.py`` (MAML) and ``examples/vision/anil_fc100.py``
(ANIL): per task, ``clone()``, ``adapt()`` on the support loss for ``inner_steps`` steps, query loss and
accuracy, ``backward()``; then the gradients are averaged over the meta-batch and Adam steps. Tasks are one
fixed meta-batch of random images of the right shape made before timing, so task sampling is not counted.
Support and query come as separate tensors, which is what the examples' index trick produces.

The same loop runs through metagrad's learn2learn layer with ``--library metagrad`` (metagrad's
interpreter; only the import differs, as for a user who changes one line), and on a user's own torch
network instead of the library's ``OmniglotCNN`` with ``--network user`` (:func:`user_network`).

Usage (one JSON line per config on stdout)::

    .bench/l2l-venv/bin/python benchmarks/l2l_baseline.py --config a --iterations 10
    python benchmarks/l2l_baseline.py --library metagrad --network user --config a   # metagrad's layer

Peak RSS is the process's, so run one config per process when comparing memory.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

# The standard configurations of the speed comparison. "preset" is the metagrad preset with these shapes;
# compare_learn2learn.py runs `metagrad bench --preset` on it and checks that the shapes agree.
# The image shape follows from the model: Omniglot 1x28x28, Mini-ImageNet 3x84x84.
CONFIGS: dict[str, dict[str, Any]] = {
    "a": {"description": "Omniglot MAML 5-way 1-shot, meta-batch 32, 1 step, second order",
          "preset": "omniglot-maml-5w1s", "algorithm": "maml", "model": "omniglot-cnn",
          "ways": 5, "shots": 1, "query_shots": 1, "meta_batch_size": 32, "inner_steps": 1,
          "inner_lr": 0.4, "first_order": False},
    "a-fo": {"description": "Omniglot MAML 5-way 1-shot, meta-batch 32, 1 step, first order",
             "preset": "omniglot-fomaml-5w1s", "algorithm": "maml", "model": "omniglot-cnn",
             "ways": 5, "shots": 1, "query_shots": 1, "meta_batch_size": 32, "inner_steps": 1,
             "inner_lr": 0.4, "first_order": True},
    "b": {"description": "Omniglot MAML 20-way 1-shot, meta-batch 16, 5 steps, second order",
          "preset": "omniglot-maml-20w1s", "algorithm": "maml", "model": "omniglot-cnn",
          "ways": 20, "shots": 1, "query_shots": 1, "meta_batch_size": 16, "inner_steps": 5,
          "inner_lr": 0.1, "first_order": False},
    "c": {"description": "Omniglot ANIL 5-way 1-shot, meta-batch 32, 1 step, second order",
          "preset": "omniglot-anil-5w1s", "algorithm": "anil", "model": "omniglot-cnn",
          "ways": 5, "shots": 1, "query_shots": 1, "meta_batch_size": 32, "inner_steps": 1,
          "inner_lr": 0.4, "first_order": False},
    "d": {"description": "Mini-ImageNet MAML 5-way 1-shot, 15 queries, meta-batch 4, 5 steps, 32 filters",
          "preset": "mini-imagenet-maml-5w1s", "algorithm": "maml", "model": "mini-imagenet-cnn",
          "ways": 5, "shots": 1, "query_shots": 15, "meta_batch_size": 4, "inner_steps": 5,
          "inner_lr": 0.01, "first_order": False},
}

IMAGE_SHAPES = {"omniglot-cnn": (1, 28, 28), "mini-imagenet-cnn": (3, 84, 84)}
META_LR = 1e-3
LIBRARIES = ("learn2learn", "metagrad")
NETWORKS = ("library", "user")  # the library's own network of the config, or user_network


def user_network(ways: int, channels: int = 1, hidden: int = 64) -> torch.nn.Module:
    """A user's own torch network, as learn2learn users write them: four blocks of 3x3 convolution,
    ``BatchNorm2d`` (torch's defaults, running statistics), ReLU and 2x2 max-pooling, then a linear head;
    (B, channels, 28, 28) -> (B, ways). Nothing in it is learn2learn's or metagrad's."""
    nn = torch.nn
    layers: list[torch.nn.Module] = []
    for c_in in [channels] + [hidden] * 3:
        layers += [nn.Conv2d(c_in, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, ways))  # 28-14-7-3-1: (B, hidden)


def import_learn2learn() -> types.SimpleNamespace:
    """Imports learn2learn's MAML and CNN4 models without running its package ``__init__``.

    Returns:
        Namespace with ``MAML``, ``OmniglotCNN``, ``MiniImagenetCNN`` and ``version``.

    Raises:
        ModuleNotFoundError: learn2learn is not installed in this interpreter's environment.
    """
    spec = importlib.util.find_spec("learn2learn")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"learn2learn is not installed for {sys.executable}; run benchmarks/setup_peers.sh")
    root = Path(next(iter(spec.submodule_search_locations)))
    # Empty stand-ins for the packages whose __init__ pulls torchvision, gym, lightning...
    # learn2learn.utils and learn2learn.nn keep their real __init__ (they import only torch).
    for name in ("learn2learn", "learn2learn.algorithms", "learn2learn.vision", "learn2learn.vision.models"):
        if name in sys.modules:
            continue
        path = root.joinpath(*name.split(".")[1:])
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        stub.__spec__.submodule_search_locations = [str(path)]
        sys.modules[name] = stub
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, stub)
    version = importlib.import_module("learn2learn._version").__version__
    maml = importlib.import_module("learn2learn.algorithms.maml")
    importlib.import_module("learn2learn.nn")  # cnn4 reaches l2l.nn.Flatten / l2l.nn.Lambda at build time
    cnn4 = importlib.import_module("learn2learn.vision.models.cnn4")
    return types.SimpleNamespace(MAML=maml.MAML, OmniglotCNN=cnn4.OmniglotCNN,
                                 MiniImagenetCNN=cnn4.MiniImagenetCNN, version=version)


def import_library(library: str) -> types.SimpleNamespace:
    """learn2learn's MAML and models (:func:`import_learn2learn`), or metagrad's learn2learn layer's."""
    if library == "learn2learn":
        return import_learn2learn()
    if library != "metagrad":
        raise ValueError(f"unknown library {library!r}; expected one of {', '.join(LIBRARIES)}")
    import metagrad
    import metagrad.compat.learn2learn as l2l

    return types.SimpleNamespace(MAML=l2l.algorithms.MAML, OmniglotCNN=l2l.vision.models.OmniglotCNN,
                                 MiniImagenetCNN=l2l.vision.models.MiniImagenetCNN,
                                 version=metagrad.__version__)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == targets).float().mean()


def _random_tasks(cfg: dict[str, Any], device: torch.device, generator: torch.Generator):
    """One meta-batch: support (T, N*K, C, H, W), query (T, N*Q, C, H, W), float in [0, 1], labels 0..N-1."""
    t, n = cfg["meta_batch_size"], cfg["ways"]
    shape = IMAGE_SHAPES[cfg["model"]]

    def images(per_class: int) -> torch.Tensor:
        pixels = torch.randint(0, 256, (t, n * per_class, *shape), dtype=torch.uint8, generator=generator)
        return (pixels.float() / 255).to(device)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(n).repeat_interleave(per_class).expand(t, -1).contiguous().to(device)

    k, q = cfg["shots"], cfg["query_shots"]
    return images(k), labels(k), images(q), labels(q)


def _build(l2l: types.SimpleNamespace, cfg: dict[str, Any], network: str = "library") -> torch.nn.Module:
    if network == "user":
        if cfg["model"] != "omniglot-cnn" or cfg["algorithm"] != "maml":
            raise ValueError("--network user is MAML on Omniglot's (1, 28, 28) images")
        return user_network(cfg["ways"])
    if cfg["model"] == "omniglot-cnn":
        return l2l.OmniglotCNN(output_size=cfg["ways"], hidden_size=64, layers=4)
    if cfg["model"] == "mini-imagenet-cnn":
        return l2l.MiniImagenetCNN(output_size=cfg["ways"], hidden_size=32, layers=4)
    raise ValueError(f"unknown model {cfg['model']!r}; expected one of {sorted(IMAGE_SHAPES)}")


def make_meta_backward(l2l: types.SimpleNamespace, cfg: dict[str, Any], model: torch.nn.Module, *,
                       joint_features: bool = True):
    """Returns ``(meta_backward, parameters)``: ``meta_backward(support_x, support_y, query_x, query_y)``
    zeroes the gradients and fills ``parameters``' ``.grad`` with the mean meta-gradient, as the examples do.

    ``joint_features``: ANIL's body runs on support and query together (anil_fc100.py), so BatchNorm
    normalizes them with one set of statistics; False runs it on each alone, metagrad's (and MAML's)
    convention, which ``compare_peers.py --check`` needs to compare meta-gradients.
    """
    loss_fn = torch.nn.CrossEntropyLoss(reduction="mean")
    steps = cfg["inner_steps"]  # the meta-batch is the tasks given (--check passes fewer)

    if cfg["algorithm"] == "anil":
        # anil_fc100.py: the body runs on the whole task (support and query together), MAML wraps the head.
        features = model.features
        head = l2l.MAML(model.classifier, lr=cfg["inner_lr"], first_order=cfg["first_order"])
        parameters = list(features.parameters()) + list(head.parameters())
    else:
        features = None
        head = l2l.MAML(model, lr=cfg["inner_lr"], first_order=cfg["first_order"])
        parameters = list(head.parameters())

    def meta_backward(support_x, support_y, query_x, query_y) -> float:
        for p in parameters:
            p.grad = None  # optimizer.zero_grad()
        meta_error = 0.0
        tasks = support_x.shape[0]
        for task in range(tasks):
            learner = head.clone()
            sx, sy, qx, qy = support_x[task], support_y[task], query_x[task], query_y[task]
            if features is not None and joint_features:
                embedded = features(torch.cat([sx, qx]))  # (N*K + N*Q, D)
                sx, qx = embedded[: sx.shape[0]], embedded[sx.shape[0]:]
            elif features is not None:
                sx, qx = features(sx), features(qx)  # (N*K, D), (N*Q, D)
            for _ in range(steps):
                learner.adapt(loss_fn(learner(sx), sy))
            logits = learner(qx)
            error = loss_fn(logits, qy)
            error.backward()
            meta_error += error.item()
            _accuracy(logits, qy).item()  # the examples log it every task
        for p in parameters:
            p.grad.data.mul_(1.0 / tasks)
        return meta_error / tasks

    return meta_backward, parameters


def make_step(l2l: types.SimpleNamespace, cfg: dict[str, Any], device: torch.device,
              network: str = "library"):
    """Returns ``step(support_x, support_y, query_x, query_y)``: one meta-training iteration as the
    examples do."""
    model = _build(l2l, cfg, network).to(device)
    meta_backward, parameters = make_meta_backward(l2l, cfg, model)
    optimizer = torch.optim.Adam(parameters, lr=META_LR)

    def step(support_x, support_y, query_x, query_y) -> float:
        meta_error = meta_backward(support_x, support_y, query_x, query_y)
        optimizer.step()
        return meta_error

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: str, *, iterations: int = 10, warmup: int = 2, device: str = "cpu", seed: int = 0,
        library: str = "learn2learn", network: str = "library") -> dict:
    """Times one config; returns the JSON-able result (median s/iter after ``warmup`` iterations)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {sorted(CONFIGS)}")
    cfg = CONFIGS[config]
    l2l = import_library(library)
    dev = torch.device(device)
    torch.manual_seed(seed)
    import numpy as np  # CNN4's init draws from scipy, i.e. numpy's global RNG

    np.random.seed(seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step = make_step(l2l, cfg, dev, network)
    batch = _random_tasks(cfg, dev, torch.Generator().manual_seed(seed))
    times = []
    for i in range(warmup + iterations):
        _sync(dev)
        start = time.perf_counter()
        step(*batch)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    return {
        "library": library, "network": network, "version": l2l.version, "config": config,
        "description": cfg["description"],
        "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "machine": platform.machine(), "iterations": iterations, "warmup": warmup,
        "sec_per_iter": sec, "tasks_per_sec": cfg["meta_batch_size"] / sec, "peak_mem_mb": peak_mb,
        "times": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS),
                        help="config to time (repeatable; default: all). Peak RSS is per process.")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--library", choices=LIBRARIES, default="learn2learn",
                        help="whose MAML and models run the loop (metagrad: its learn2learn layer)")
    parser.add_argument("--network", choices=NETWORKS, default="library",
                        help="the library's network of the config, or a user's torch network (user_network)")
    parser.add_argument("--check", action="store_true", help="only import learn2learn and build each model")
    args = parser.parse_args(argv)
    if args.check:
        l2l = import_learn2learn()
        for cfg in CONFIGS.values():
            _build(l2l, cfg)
        print(json.dumps({"library": "learn2learn", "version": l2l.version, "ok": True}))
        return 0
    for config in args.config or list(CONFIGS):
        result = run(config, iterations=args.iterations, warmup=args.warmup, device=args.device,
                     seed=args.seed, library=args.library, network=args.network)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
