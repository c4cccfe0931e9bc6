"""MAML and ANIL meta-training steps of metagrad's peers, each written as the peer's own examples write it.

Runs inside a peer's virtual environment (``setup_peers.sh``: torch plus the peer, no metagrad), or with
metagrad's interpreter for ``torch.func`` (torch alone). ``compare_peers.py`` starts it once per
measurement, so that peak RSS is one run's. The recipes:

* ``learn2learn`` 0.2.0: ``examples/vision/maml_omniglot.py`` and ``anil_fc100.py`` (``clone()``,
  ``adapt()``, one ``backward()`` per task, gradients averaged); the code is ``l2l_baseline.py``'s, on
  learn2learn's own ``OmniglotCNN``/``MiniImagenetCNN``.
* ``higher`` 0.2.1: ``examples/maml-omniglot.py`` (``higher.innerloop_ctx`` over an SGD inner optimizer,
  ``copy_initial_weights=False``, one ``backward()`` per task, query losses summed).
* ``torchopt`` 0.7.3: ``examples/few-shot/maml_omniglot.py`` (``torchopt.MetaSGD`` stepping the module in
  place, ``extract_state_dict``/``recover_state_dict`` around each task, query losses summed).
* ``torch.func``: PyTorch's ``functorch/examples/maml_omniglot/maml-omniglot-transforms.py``
  (``functional_call`` + ``grad`` in a per-task loss, ``vmap`` over the tasks, ``.sum().backward()``).
* ``parallel-metalearn`` 0.5.6 (``import metalearn``): its README's MAML (``MAML_Model(backbone, head)``,
  ``CrossEntropy(metric_fn=CategoricalAccuracy())``, ``InnerSGD(initial_fast_weights=...,
  first_order=False)``, ``MAML(...)`` with its defaults: ``backend="vmap"``, ``chunk_size=80``, so a
  meta-batch of up to 80 tasks is one vmap), one ``algorithm.step(task_iterator)`` per iteration.

ANIL has an example only in learn2learn; the others are written in their MAML example's idiom with the
inner loop on the head (``model.classifier``) and the body (``model.features``) run once per task.
higher, TorchOpt and torch.func get the same network as metagrad and learn2learn (learn2learn's CNN4:
3x3 convolutions, BatchNorm with eps 1e-3 on batch statistics, ReLU; stride 2 and a spatial mean on
Omniglot, 2x2 max-pools on Mini-ImageNet), written as the examples write theirs, an ``nn.Sequential``.

Usage (one JSON line on stdout)::

    .bench/higher-venv/bin/python benchmarks/peer_recipes.py --peer higher --config a --iterations 10
    python benchmarks/peer_recipes.py --peer torch.func --check-file check-a.pt   # meta-gradient check
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import l2l_baseline
from l2l_baseline import CONFIGS, IMAGE_SHAPES, META_LR

PEERS = ("learn2learn", "higher", "torchopt", "torch.func", "parallel-metalearn")
BN_EPS = 1e-3  # learn2learn's and metagrad's few-shot networks (torch's default is 1e-5)

MetaBackward = Callable[[Tensor, Tensor, Tensor, Tensor], float]


def build_network(cfg: dict[str, Any]) -> nn.Sequential:
    """The config's network as an ``nn.Sequential`` with ``features`` and ``classifier`` children."""
    ways, model = cfg["ways"], cfg["model"]
    if model == "omniglot-cnn":
        channels, hidden, strided = 1, 64, True
    elif model == "mini-imagenet-cnn":
        channels, hidden, strided = 3, 32, False
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(IMAGE_SHAPES)}")
    layers: list[nn.Module] = []
    for c_in in [channels] + [hidden] * 3:
        layers += [nn.Conv2d(c_in, hidden, 3, stride=2 if strided else 1, padding=1),
                   nn.BatchNorm2d(hidden, eps=BN_EPS, track_running_stats=False), nn.ReLU()]
        if not strided:
            layers.append(nn.MaxPool2d(2))
    if strided:  # 28-14-7-4-2: mean over the 2x2 positions (the MAML paper's Omniglot CNN)
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, hidden, 1, 1) -> (B, hidden)
        width = hidden
    else:  # 84-42-21-10-5
        layers.append(nn.Flatten())  # (B, hidden, 5, 5) -> (B, 25 * hidden)
        width = hidden * 25
    return nn.Sequential(collections.OrderedDict(
        features=nn.Sequential(*layers), classifier=nn.Linear(width, ways)))


def canonical_parameters(model: nn.Module, norm_types: tuple[type, ...] = (nn.BatchNorm2d,)) -> list[Tensor]:
    """Parameters in one order for every library: per block conv weight, bias, norm weight, bias; then the
    head's weight and bias (learn2learn registers a block's norm before its conv: module orders differ)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, norm_types)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(convs) != len(norms) or len(linears) != 1:
        raise ValueError(f"expected conv/norm blocks and one linear head, got {len(convs)} convolutions, "
                         f"{len(norms)} norms, {len(linears)} linear layers")
    out: list[Tensor] = []
    for conv, norm in zip(convs, norms, strict=True):
        out += [conv.weight, conv.bias, norm.weight, norm.bias]
    return out + [linears[0].weight, linears[0].bias]


def _accuracy(logits: Tensor, targets: Tensor) -> float:
    return (logits.argmax(dim=1) == targets).float().mean().item()  # the examples log it every task


def learn2learn_recipe(cfg: dict[str, Any], *, joint_features: bool = True):
    """learn2learn's ``OmniglotCNN``/``MiniImagenetCNN`` and ``l2l_baseline``'s step (the examples')."""
    l2l = l2l_baseline.import_learn2learn()
    model = l2l_baseline._build(l2l, cfg)
    for module in model.modules():  # learn2learn 0.2.0 leaves BatchNorm at torch's eps 1e-5
        if isinstance(module, nn.BatchNorm2d):
            module.eps = BN_EPS
    meta_backward, parameters = l2l_baseline.make_meta_backward(l2l, cfg, model,
                                                                joint_features=joint_features)
    return model, meta_backward, parameters, 1.0


def higher_recipe(cfg: dict[str, Any]):
    """higher's ``examples/maml-omniglot.py``: ``innerloop_ctx`` per task, the query losses summed."""
    import higher

    net = build_network(cfg)
    anil = cfg["algorithm"] == "anil"
    adapted = net.classifier if anil else net
    inner_opt = torch.optim.SGD(adapted.parameters(), lr=cfg["inner_lr"])

    def meta_backward(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> float:
        net.zero_grad(set_to_none=True)  # meta_opt.zero_grad()
        total = 0.0
        for i in range(x_spt.shape[0]):
            spt, qry = x_spt[i], x_qry[i]
            if anil:  # the body runs once per task; the inner loop sees its features
                spt, qry = net.features(spt), net.features(qry)
            with higher.innerloop_ctx(adapted, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(cfg["inner_steps"]):
                    diffopt.step(F.cross_entropy(fnet(spt), y_spt[i]))
                qry_logits = fnet(qry)
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                _accuracy(qry_logits, y_qry[i])
                qry_loss.backward()
                total += qry_loss.item()
        return total

    # The example sums the tasks' query losses (Adam barely notices the scale); the mean is 1/T of it.
    return net, meta_backward, list(net.parameters()), "sum"


def torchopt_recipe(cfg: dict[str, Any]):
    """TorchOpt's ``examples/few-shot/maml_omniglot.py``: ``MetaSGD`` in place, state recovered per task."""
    import torchopt

    net = build_network(cfg)
    anil = cfg["algorithm"] == "anil"
    adapted = net.classifier if anil else net
    inner_opt = torchopt.MetaSGD(adapted, lr=cfg["inner_lr"])

    def meta_backward(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> float:
        net.zero_grad(set_to_none=True)  # meta_opt.zero_grad()
        net_state = torchopt.extract_state_dict(adapted, by="reference", detach_buffers=True)
        optim_state = torchopt.extract_state_dict(inner_opt)
        total = 0.0
        for i in range(x_spt.shape[0]):
            spt, qry = x_spt[i], x_qry[i]
            if anil:
                spt, qry = net.features(spt), net.features(qry)
            head = adapted if anil else net
            for _ in range(cfg["inner_steps"]):
                inner_opt.step(F.cross_entropy(head(spt), y_spt[i]))
            qry_logits = head(qry)
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            _accuracy(qry_logits, y_qry[i])
            qry_loss.backward()
            total += qry_loss.item()
            torchopt.recover_state_dict(adapted, net_state)
            torchopt.recover_state_dict(inner_opt, optim_state)
        return total

    # MetaSGD swaps the module's parameters for non-leaf tensors and back: keep the leaves now.
    return net, meta_backward, list(net.parameters()), "sum"


def torch_func_recipe(cfg: dict[str, Any], *, vectorize: bool = True):
    """PyTorch's ``maml-omniglot-transforms.py``: a per-task loss of ``functional_call`` + ``grad``, vmapped.

    ``vectorize=False`` loops over the tasks instead of ``vmap``: ``compare_peers.py --check`` uses it to
    show where an inexact meta-gradient comes from.
    """
    from torch.func import functional_call, grad, vmap

    net = build_network(cfg)
    anil = cfg["algorithm"] == "anil"

    def loss_for_task(net: nn.Module, n_inner_iter: int, x_spt: Tensor, y_spt: Tensor, x_qry: Tensor,
                      y_qry: Tensor) -> tuple[Tensor, Tensor]:
        module = net.classifier if anil else net
        params = dict(module.named_parameters())
        if anil:  # the body runs once per task; the inner loop adapts the head on its features
            x_spt, x_qry = net.features(x_spt), net.features(x_qry)

        def compute_loss(new_params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(functional_call(module, new_params, (x,)), y)

        new_params = params
        for _ in range(n_inner_iter):
            grads = grad(compute_loss)(new_params, x_spt, y_spt)
            new_params = {k: new_params[k] - g * cfg["inner_lr"] for k, g in grads.items()}
        qry_logits = functional_call(module, new_params, (x_qry,))
        qry_loss = F.cross_entropy(qry_logits, y_qry)
        qry_acc = (qry_logits.argmax(dim=1) == y_qry).float().mean()
        return qry_loss, qry_acc

    compute_loss_for_task = functools.partial(loss_for_task, net, cfg["inner_steps"])

    def meta_backward(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> float:
        net.zero_grad(set_to_none=True)  # meta_opt.zero_grad()
        if vectorize:
            qry_losses, _ = vmap(compute_loss_for_task)(x_spt, y_spt, x_qry, y_qry)
        else:
            pairs = [compute_loss_for_task(*task) for task in zip(x_spt, y_spt, x_qry, y_qry, strict=True)]
            qry_losses = torch.stack([loss for loss, _ in pairs])
        qry_losses.sum().backward()  # the example sums the tasks' losses
        return qry_losses.detach().sum().item()

    return net, meta_backward, list(net.parameters()), "sum"


class _Called(nn.Module):
    """Runs ``module`` on x alone: parallel-metalearn calls its backbone and head with keyword flags
    (``training``, ``num_step``) that torch's layers do not take."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return self.module(x)


def parallel_metalearn_recipe(cfg: dict[str, Any], *, vectorize: bool = True):
    """parallel-metalearn's README MAML (vmap backend, default chunking) on the same ``nn.Sequential``.

    Its ``MAML.step`` zeroes the gradients, back-propagates each chunk and steps its outer optimizer
    itself; that optimizer is given a learning rate of 0 here, so that ``run``'s Adam (the same as every
    other peer's) makes the update and ``--check`` reads the meta-gradient. ``InnerSGD``'s README form
    keeps its default ``learn_lr=True``: the inner rate is a meta-parameter (its value, ``inner_lr``,
    is the config's), so the model's meta-gradient is MAML's and the rate gets one beside it.
    ``vectorize=False``: its ``backend="sequential"`` (a loop over tasks), for ``compare_peers.py --check``.
    """
    from metalearn.algorithms import MAML
    from metalearn.inner_optimizers import InnerSGD
    from metalearn.loss import CategoricalAccuracy, CrossEntropy
    from metalearn.model_wrappers import MAML_Model

    net = build_network(cfg)
    if cfg["algorithm"] == "anil":
        model = MAML_Model(backbone=_Called(net.features), head=_Called(net.classifier),
                           fast_weights_names="ANIL")
    else:
        model = MAML_Model(backbone=_Called(net.features), head=_Called(net.classifier))
    loss_fn = CrossEntropy(metric_fn=CategoricalAccuracy())
    inner_optimizer = InnerSGD(initial_fast_weights=model.get_fast_weights(), inner_lr=cfg["inner_lr"],
                               first_order=False)
    gradients_only = torch.optim.SGD(model.parameters(), lr=0.0)  # see the docstring
    algorithm = MAML(model=model, optimizer=gradients_only, inner_optimizer=inner_optimizer,
                     support_loss_fn=loss_fn, inner_steps=cfg["inner_steps"],
                     **({} if vectorize else {"backend": "sequential"}))

    def meta_backward(x_spt: Tensor, y_spt: Tensor, x_qry: Tensor, y_qry: Tensor) -> float:
        tasks = iter([(x_spt, {"labels": y_spt}, x_qry, {"labels": y_qry})])  # its loader's batch format
        meta_loss, _ = algorithm.step(tasks, training=True)
        return meta_loss

    # MAML.step already averages the chunks' losses over the meta-batch.
    return model, meta_backward, list(model.parameters()) + list(inner_optimizer.parameters()), 1.0


def make_recipe(peer: str, cfg: dict[str, Any], **options: Any):
    """``(model, meta_backward, parameters, reduction)``; reduction "sum" or 1.0 (already the mean)."""
    recipes = {"learn2learn": learn2learn_recipe, "higher": higher_recipe, "torchopt": torchopt_recipe,
               "torch.func": torch_func_recipe, "parallel-metalearn": parallel_metalearn_recipe}
    if peer not in recipes:
        raise ValueError(f"unknown peer {peer!r}; expected one of {', '.join(PEERS)}")
    if cfg["first_order"]:
        raise ValueError("the peers' recipes are second order; first-order configs are compared in "
                         "compare_learn2learn.py")
    return recipes[peer](cfg, **options)


def peer_version(peer: str) -> str:
    if peer == "learn2learn":
        return l2l_baseline.import_learn2learn().version
    if peer == "torch.func":
        return torch.__version__
    if peer == "parallel-metalearn":
        __import__("metalearn")
        return importlib.metadata.version(peer)
    __import__(peer)
    return importlib.metadata.version(peer)  # higher has no __version__


def run(peer: str, config: str, *, iterations: int, warmup: int, seed: int = 0,
        device: str = "cpu") -> dict[str, Any]:
    """Times ``iterations`` steps (meta-backward + Adam) on one fixed random meta-batch; median s/iter.

    Peak memory as ``metagrad bench`` reports it: the process's peak RSS on the CPU,
    ``torch.cuda.max_memory_allocated`` on CUDA.
    """
    cfg = CONFIGS[config]
    where = torch.device(device)
    torch.manual_seed(seed)
    model, meta_backward, parameters, _ = make_recipe(peer, cfg)
    model.to(where)  # in place: the recipe's closures keep the same parameters
    optimizer = torch.optim.Adam(parameters, lr=META_LR)
    batch = l2l_baseline._random_tasks(cfg, where, torch.Generator().manual_seed(seed))
    cuda = where.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(where)
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        meta_backward(*batch)
        optimizer.step()
        if cuda:
            torch.cuda.synchronize(where)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated(where) / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux
    return {"library": peer, "version": peer_version(peer), "config": config, "device": str(where),
            "device_name": torch.cuda.get_device_name(where) if cuda else platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
            "machine": platform.machine(), "iterations": iterations, "warmup": warmup, "sec_per_iter": sec,
            "tasks_per_sec": cfg["meta_batch_size"] / sec, "peak_mem_mb": peak,
            "peak_mem_kind": "cuda_max_allocated" if cuda else "rss", "times": times}


def max_relative_difference(got: list[Tensor], want: list[Tensor]) -> float:
    """max over tensors of max|got - want| / max|want|, each tensor against its own scale, floored at 1e-3 of
    the whole gradient's: a convolution bias before BatchNorm has a zero meta-gradient (the normalization
    removes it), so both libraries return rounding noise for it, which has no scale of its own."""
    floor = 1e-3 * max(w.abs().max().item() for w in want)
    return max(((g - w).abs().max() / w.abs().max().clamp_min(floor)).item()
               for g, w in zip(got, want, strict=True))


def check(peer: str, path: Path, **options: Any) -> dict[str, Any]:
    """The peer's meta-gradient, in float64, on the meta-batch and weights of ``path`` (written by
    ``compare_peers.py``), against the meta-gradient metagrad computed there."""
    data = torch.load(path, weights_only=True)
    cfg = {**CONFIGS[data["config"]], **data["overrides"]}
    torch.set_default_dtype(torch.float64)
    model, meta_backward, _, reduction = make_recipe(peer, cfg, **options)
    model.double()
    ordered = canonical_parameters(model)
    with torch.no_grad():
        for p, value in zip(ordered, data["weights"], strict=True):
            p.copy_(value)
    meta_backward(data["support_x"], data["support_y"], data["query_x"], data["query_y"])
    tasks = data["support_x"].shape[0]
    grads = [p.grad / tasks if reduction == "sum" else p.grad for p in ordered]
    return {"library": peer, "config": data["config"], "options": options,
            "max_rel_diff": max_relative_difference(grads, data["grads"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", required=True, choices=PEERS)
    parser.add_argument("--config", choices=sorted(CONFIGS), help="config to time")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--device", default="cpu", help="where to time: cpu (default), cuda, cuda:N")
    parser.add_argument("--check-file", type=Path, help="compare the meta-gradient with this file's instead")
    parser.add_argument("--loop", action="store_true",
                        help="--check-file, torch.func or parallel-metalearn: loop instead of vmap")
    parser.add_argument("--import-only", action="store_true", help="import the peer and build each network")
    args = parser.parse_args(argv)
    if args.import_only:
        print(json.dumps({"library": args.peer, "version": peer_version(args.peer), "ok": True}))
        return 0
    if args.check_file:
        options = {"vectorize": False} if args.loop else {}
        if args.peer == "learn2learn":
            options = {"joint_features": False}  # BatchNorm statistics per support and query, as metagrad
        print(json.dumps(check(args.peer, args.check_file, **options)))
        return 0
    if args.config is None:
        parser.error("give --config (or --check-file, --import-only)")
    print(json.dumps(run(args.peer, args.config, iterations=args.iterations, warmup=args.warmup,
                         device=args.device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
