"""Data-parallel meta-training with ``torch.distributed``: who this process is, its tasks, the exchanges.

``torchrun --nproc-per-node N -m metagrad train ...`` starts N processes that each run all of
:func:`metagrad.training.loop.run`. Every process draws the same meta-batch from the shared seed and
adapts to its own contiguous slice of the tasks; :func:`all_reduce_gradients` then gives every process
the meta-batch's gradient (the sum over processes of each slice's summed task gradients, divided by
the number of tasks: the single-process mean up to the order of the float additions), so every
process takes the same Adam step and holds the same parameters. Validation and test tasks are split
the same way and their scores gathered back in task order. Rank 0 alone writes the run folder.

Without torchrun's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` a run is one process (rank 0 of 1) and
every function here does nothing (or runs its argument directly). The backend is gloo on CPU and NCCL
on CUDA, with one GPU per process: ``cuda:LOCAL_RANK``.

Faults: joining the process group and every exchange wait at most ``run.dist_timeout_s`` seconds
(``--dist-timeout``); a failed exchange raises :class:`~metagrad.errors.TrainingError` saying what
failed (with NCCL, whose exchanges run asynchronously, its watchdog may end the process itself).
torchrun stops every process as soon as one exits with an error, so a dead process ends the job
within seconds; the job resumes from the last checkpoint with ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metagrad.algorithms.meta_batch import set_gradients
from metagrad.errors import ConfigError, MetagradError, TrainingError
from metagrad.types import Params

__all__ = [
    "ONE_PROCESS",
    "World",
    "all_reduce_gradients",
    "any_rank",
    "check_meta_batch_size",
    "check_same_parameters",
    "exchange_meta_gradient",
    "gather_tasks",
    "local_main_first",
    "on_main",
    "process_device",
    "process_group",
    "task_range",
    "world_from_environment",
]

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run; one process alone is rank 0 of 1."""

    rank: int = 0  # 0 .. size - 1 over every node; rank 0 writes the run folder
    size: int = 1  # number of processes over every node
    local_rank: int = 0  # rank on this node: the GPU this process uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = World()
"""The world of a run without torchrun."""


def world_from_environment() -> World:
    """The :class:`World` torchrun describes in ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``.

    Raises:
        ConfigError: the variables are set but are not consistent integers.
    """
    if "WORLD_SIZE" not in os.environ:
        return ONE_PROCESS
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    try:
        rank, size, local_rank = (int(os.environ.get(name, "0")) for name in names)
    except ValueError:
        found = ", ".join(f"{name}={os.environ.get(name)!r}" for name in names)
        raise ConfigError(f"torch.distributed variables must be integers, got {found}; "
                          "launch with torchrun") from None
    if not (size >= 1 and 0 <= rank < size and local_rank >= 0):
        raise ConfigError(f"inconsistent RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local_rank}; "
                          f"launch with torchrun")
    return World(rank, size, local_rank)


def check_meta_batch_size(meta_batch_size: int, world: World) -> None:
    """Raise unless every process gets the same number of training tasks.

    Raises:
        ConfigError: ``meta_batch_size`` is not a multiple of the number of processes.
    """
    if meta_batch_size % world.size:
        lower = meta_batch_size - meta_batch_size % world.size
        examples = " or ".join(str(n) for n in (lower, lower + world.size) if n > 0)
        raise ConfigError(
            f"meta.meta_batch_size (--meta-batch-size) {meta_batch_size} does not split evenly over "
            f"{world.size} processes; use a multiple of {world.size} (e.g. {examples}), or a number of "
            f"processes that divides {meta_batch_size}"
        )


def task_range(num_tasks: int, world: World) -> tuple[int, int]:
    """This process's contiguous share ``[start, stop)`` of ``num_tasks`` tasks.

    Shares are in rank order and differ in size by at most one (the first ``num_tasks % size`` ranks
    take one more); a share may be empty when there are fewer tasks than processes.
    """
    base, extra = divmod(num_tasks, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def process_device(world: World, device: torch.device) -> torch.device:
    """The device this process computes on: ``device``, or for CUDA under torchrun ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: a single GPU named for several processes, more processes than GPUs on this node,
            or Apple MPS (which torch.distributed does not support).
    """
    if world.size == 1:
        return device
    if device.type == "mps":
        raise ConfigError("multi-process training runs on CPU (gloo) or CUDA (NCCL), not on Apple MPS; "
                          "use --device cpu")
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                          f"use --device cuda (or auto)")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"process LOCAL_RANK={world.local_rank} needs cuda:{world.local_rank}, but this node has "
            f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node {torch.cuda.device_count()} or fewer"
        )
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[None]:
    """Join the processes of ``world`` for the duration of the block (nothing to do for one process).

    A process group the caller already set up is used as it is and left in place.

    Args:
        world: this process's place.
        device: its device (from :func:`process_device`): CUDA picks NCCL, anything else gloo.
        timeout_s: how long joining and each exchange may wait for the other processes.

    Raises:
        TrainingError: the processes could not meet within ``timeout_s``.
    """
    if world.size == 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options["device_id"] = device  # binds NCCL to this process's GPU (no guessing in barriers)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **options)
    except (RuntimeError, ValueError) as exc:  # DistStoreError (a timeout), a missing MASTER_ADDR, ...
        raise TrainingError(
            f"process {world.rank} of {world.size} could not join the others ({backend}): "
            f"{_first_line(exc)}; start every process with the same torchrun command (see the README)"
        ) from None
    yield
    # Not on errors: the process ends anyway, and NCCL's teardown can block after a failed exchange.
    # First one last exchange that every process waits for and that gloo's threads let go of (see
    # _let_go): the processes leave together, and nothing Python owns is released after Python exits.
    with _exchange("waiting for the other processes to finish"):
        last = torch.zeros(1, device=_wire_device())
        dist.all_reduce(last)
        _let_go(last)
    dist.destroy_process_group()


@contextlib.contextmanager
def _exchange(what: str) -> Iterator[None]:
    """Turn a failed collective (a process died or stalled) into a TrainingError saying what failed."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, gloo's timeouts and closed connections
        raise TrainingError(
            f"{what} failed: {_first_line(exc)}. Another process exited or stalled for longer than "
            f"run.dist_timeout_s (--dist-timeout); the job resumes from its last checkpoint with --resume"
        ) from None


LET_GO_S = 1.0
"""Seconds :func:`_let_go` waits at most (the wait is microseconds: a worker thread finishing its loop)."""


def _let_go(*tensors: Tensor) -> None:
    """Wait until gloo's worker threads have dropped their references to ``tensors``, just exchanged.

    A gloo collective returns as soon as its result is ready; the worker thread that ran it drops its
    own references to the tensors a moment later (after about one collective in four here). Were Python's
    reference dropped first, the worker's release would be the last one and would free the tensor's
    Python object from outside the interpreter. Near the process's exit that happens during interpreter
    finalization, where the thread is ended mid-destructor: "terminate called without an active
    exception", SIGABRT, after the results were written (issue 34). Keeping the last reference in Python
    ends that race. NCCL keeps references until its own watchdog lets go: not waited for.
    """
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    deadline = time.monotonic() + LET_GO_S
    while any(t._use_count() > 1 for t in tensors) and time.monotonic() < deadline:
        time.sleep(0)  # let the worker thread run


def _first_line(exc: BaseException) -> str:
    return next(iter(str(exc).strip().splitlines()), type(exc).__name__).rstrip(".")


def _wire_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_gradients(world: World, params: Params, grad_sum: Tensor, total_tasks: int) -> None:
    """Set every process's ``.grad`` to the meta-batch's gradient (one all-reduce of a flat buffer).

    ``grad_sum`` is this process's gradient of the SUM of its tasks' query losses, flat (P,) float64
    (``algorithms.chunk_gradients``). The all-reduce adds the processes' sums in float64, which is
    exact for a few float32 terms of similar size, so the order of the additions does not matter and
    any number of processes gives the bits one process gets; then ``/ total_tasks``, cast to each
    parameter's dtype. With one process this is the same arithmetic without the all-reduce.
    """
    flat = grad_sum
    if world.size > 1:
        flat = grad_sum.clone()  # all_reduce works in place; the caller's sum stays its own
        with _exchange("the meta-gradient all-reduce"):
            dist.all_reduce(flat)
            _let_go(flat)
    set_gradients(params, flat / total_tasks)


def exchange_meta_gradient(world: World, params: Params, grad_sum: Tensor, total_tasks: int, scores: Tensor,
                           indices: Tensor) -> Tensor:
    """:func:`all_reduce_gradients` and :func:`gather_tasks` of ``scores`` in one all-reduce.

    A training step exchanges the meta-gradient and the tasks' losses and accuracies; one collective
    instead of three means one wait for the slowest process and one latency per step. The scores
    ride in float64 slots beside the gradient: each slot holds one process's value plus zeros, so
    they come back exact, and the gradient part is summed exactly as in :func:`all_reduce_gradients`.

    Args:
        grad_sum: this process's flat (P,) float64 gradient sum (``algorithms.chunk_gradients``).
        total_tasks: tasks of the meta-batch over all processes.
        scores: (n, k) this process's per-task values (e.g. losses and accuracies), for ``indices``.
        indices: (n,) int64 task numbers in ``[0, total_tasks)``, disjoint across processes.

    Returns:
        (total_tasks, k) every task's scores in task order, in ``scores``' dtype and device.
    """
    if world.size == 1:
        all_reduce_gradients(world, params, grad_sum, total_tasks)
        return scores
    size = grad_sum.numel()
    flat = torch.zeros(size + total_tasks * scores.shape[1], dtype=torch.float64, device=grad_sum.device)
    flat[:size] = grad_sum
    flat[size:].view(total_tasks, -1)[indices.to(flat.device)] = scores.to(flat)
    with _exchange("the meta-gradient all-reduce"):
        dist.all_reduce(flat)
        _let_go(flat)
    set_gradients(params, flat[:size] / total_tasks)
    return flat[size:].view(total_tasks, -1).to(device=scores.device, dtype=scores.dtype)


def gather_tasks(world: World, values: Tensor, indices: Tensor, num_tasks: int) -> Tensor:
    """Every process's per-task values, in task order.

    Args:
        values: (n, ...) this process's values, for tasks ``indices``.
        indices: (n,) int64 task numbers in ``[0, num_tasks)``; the processes' indices are disjoint
            and cover every task.
        num_tasks: tasks over all processes.

    Returns:
        (num_tasks, ...) on ``values``' device, the same on every process. Each entry is one process's
        value plus zeros, so the gathered values are exact.
    """
    if world.size == 1:
        return values
    full = torch.zeros(num_tasks, *values.shape[1:], dtype=values.dtype, device=_wire_device())
    full[indices.to(full.device)] = values.to(full.device)
    with _exchange("gathering the tasks' scores"):
        dist.all_reduce(full)
        _let_go(full)
    return full.to(values.device)


def any_rank(world: World, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (so that all stop together)."""
    if world.size == 1:
        return flag
    count = torch.tensor([float(flag)], device=_wire_device())
    with _exchange("agreeing whether to stop"):
        dist.all_reduce(count)
        _let_go(count)
    return count.item() > 0


def on_main(world: World, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on rank 0 only and hand its result to every process.

    For work that must happen once (creating the run folder, reading a checkpoint). A
    :class:`~metagrad.errors.MetagradError` raised on rank 0 is raised on every process, so all stop
    with the same message.
    """
    if world.size == 1:
        return fn(*args)
    payload: list[Any] = [None, None]
    if world.is_main:
        try:
            payload[0] = fn(*args)
        except MetagradError as exc:
            payload[1] = exc
    with _exchange(f"handing out rank 0's {getattr(fn, '__name__', 'result')}"):
        dist.broadcast_object_list(payload, src=0)
    result, error = payload
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def local_main_first(world: World) -> Iterator[None]:
    """Run the block on each node's local rank 0 first, then on the node's other processes.

    For loading data: local rank 0 downloads and decodes it into the cache once, the others then
    read the cache instead of decoding (and downloading) it again all at the same time.
    """
    if world.size > 1 and world.local_rank != 0:
        with _exchange("waiting for local rank 0 to load the data"):
            dist.barrier()
    yield
    if world.size > 1 and world.local_rank == 0:
        with _exchange("waiting for local rank 0 to load the data"):
            dist.barrier()


def check_same_parameters(world: World, params: Params, iteration: int) -> None:
    """Raise unless every process holds exactly rank 0's parameters (one broadcast; cheap).

    Identical gradients after the all-reduce and a deterministic optimizer keep them identical; this
    catches what would break that (processes running different code, settings or hardware).

    Raises:
        TrainingError: on every process, when any process's parameters differ from rank 0's.
    """
    if world.size == 1:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()]).to(_wire_device())  # (P,)
    reference = flat.clone()
    with _exchange("comparing the processes' parameters"):
        dist.broadcast(reference, src=0)
        _let_go(reference)
    if any_rank(world, not torch.equal(flat, reference)):
        raise TrainingError(
            f"the processes' parameters differ after iteration {iteration}; every process must run the "
            f"same metagrad, torch and settings on the same kind of device. Nothing was saved for this "
            f"iteration: the last checkpoint is from before it"
        )
