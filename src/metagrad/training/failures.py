"""What stops a step: NaN or infinite losses and parameters, overflows and running out of memory, each
turned into one :class:`~metagrad.errors.TrainingError` that says where the last good checkpoint is;
and :func:`check_memory`, which refuses before anything is allocated a meta-batch that cannot fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from metagrad.errors import ConfigError, TrainingError
from metagrad.types import Params

__all__ = ["available_memory", "check_finite", "check_memory", "diverged", "memory_per_task", "out_of_memory",
           "saved_note", "step_guard"]


def saved_note(latest: Path) -> str:
    return f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint was written yet"


def diverged(what: str, iteration: int, latest: Path) -> TrainingError:
    return TrainingError(
        f"{what} at iteration {iteration}: training stopped before that update, {saved_note(latest)}; "
        "try a smaller --meta-lr or --inner-lr"
    )


@contextlib.contextmanager
def step_guard(iteration: int, latest: Path) -> Iterator[None]:
    """One message for what absurd settings make a step hit: a number too large for its type (torch's
    "cannot be converted ... without overflow", e.g. Adam with a huge learning rate) stops as a NaN loss
    does; running out of memory names the settings that size a step."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        reason = next(iter(str(exc).splitlines()), type(exc).__name__)
        if out_of_memory(exc):
            raise TrainingError(
                f"out of memory at iteration {iteration} ({reason}); {saved_note(latest)}. Lower "
                "--meta-batch-size, --tasks-per-chunk or --eval-tasks (or the model's size), or free memory"
            ) from None
        if "overflow" not in reason:
            raise
        raise diverged(f"a value overflowed ({reason})", iteration, latest) from None


def out_of_memory(exc: BaseException) -> bool:
    """True for the allocators' failures: Python's MemoryError, torch's CPU and CUDA out-of-memory errors."""
    text = str(exc)
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def check_finite(params: Params, iteration: int, latest: Path) -> None:
    """Refuse to go on (and so to save) with a NaN or infinite parameter."""
    bad = [name for name, tensor in params.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise diverged(f"parameter {bad[0]} is not finite", iteration, latest)


def memory_per_task(model: nn.Module, image_shape: tuple[int, int, int], *, num_classes: int, per_class: int,
                    ways: int, samples: int) -> tuple[int, int]:
    """Bytes one task of a meta-batch takes at least, whatever the chunk: ``(episode, compute)``.

    ``episode``: its share of the meta-batch, which is sampled whole (float32 images, int64 labels, the
    sampler's random keys: one per class of the split and per image of each chosen class). ``compute``:
    what one task at a time (the smallest chunk) needs at least: the model's largest layer output for
    the task's images. Both are lower bounds, so a refusal never stops a run that would fit.
    """
    c, h, w = image_shape
    images = ways * samples
    episode = images * (c * h * w * 4 + 8) + 4 * (num_classes + ways * per_class)
    outputs: list[int] = []  # elements of each leaf module's output for two images

    def count(_module: nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out.numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            # two images: a BatchNorm over one sample of a linear layer has no variance to normalize by
            model(torch.zeros(2, c, h, w, device=param.device if param is not None else None))
    except Exception:  # noqa: BLE001 - a model that cannot run one image alone: count the episode only
        outputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return episode, 4 * max(outputs, default=0) // 2 * images


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: CUDA's free memory; on the CPU the kernel's
    MemAvailable, lowered to the control group's limit (a container's, a job's) where one is set. None
    where it cannot be told (Apple MPS, no /proc)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError, StopIteration):
        pass
    return free


def check_memory(what: str, tasks: int, per_task: tuple[int, int], device: torch.device, fix: str) -> None:
    """Refuse ``tasks`` tasks of ``per_task`` bytes (:func:`memory_per_task`) that cannot fit in the memory
    left on ``device``, before anything is allocated for them.

    Raises:
        ConfigError: the estimate exceeds the available memory; says both, and how many tasks fit.
    """
    free = available_memory(device)
    episode, compute = per_task
    need = tasks * episode + compute  # the whole episode, one task computed at a time
    if free is None or need <= free:
        return
    raise ConfigError(
        f"{what} = {tasks} tasks need at least {_size(need)} ({_size(episode)} a task for its images and "
        f"indices, sampled at once, and {_size(compute)} to compute one task), but {device.type} has "
        f"{_size(free)} available; {fix} (at most about {max((free - compute) // episode, 0)} would fit)"
    )


def _size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return ""
