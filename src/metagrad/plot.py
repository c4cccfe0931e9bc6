"""Learning curves of a run, drawn from its ``metrics.jsonl`` (``metagrad plot``).

Kept out of the training code: plotting reads only the metric rows a run folder holds, so it works on
finished, running and interrupted runs alike, and training never imports matplotlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from metagrad.errors import ConfigError, FileError, describe_os_error
from metagrad.training.metrics import read_metrics

__all__ = ["plot_run"]

SMOOTHING_WINDOW = 51
"""Train rows are noisy (one meta-batch each): a centred mean over this many rows is drawn over them."""


def _centred_mean(values: list[float], window: int) -> list[float]:
    """Each value's mean with the ``window // 2`` rows on either side: centred, so the curve does not lag
    behind the raw points as a trailing average does. Near the ends the window shrinks to the rows that
    exist on both sides (the first and last values stand alone)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])  # (n + 1,)
    index = np.arange(len(values))
    half = np.minimum(window // 2, np.minimum(index, len(values) - 1 - index))  # (n,) symmetric reach
    return ((sums[index + half + 1] - sums[index - half]) / (2 * half + 1)).tolist()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _steps(count: Any) -> str:
    return f"{count} inner step{'' if count == 1 else 's'}" if isinstance(count, int) else "inner steps ?"


def _test_mark(run_dir: Path, test_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The test result to mark: the run's own meta-test row, else the evaluation of its best checkpoint
    (``metagrad eval``: an unfinished run, a published ``results/<preset>``) as step, loss, acc, steps."""
    if test_rows:
        return {**test_rows[-1], "inner_steps": None}
    for name in ("eval_best.json", "results.json"):
        found = _read_json(run_dir / name)
        if isinstance(found.get("checkpoint_iteration"), int) and "test_accuracy" in found:
            return {"step": found["checkpoint_iteration"], "loss": found.get("test_loss"),
                    "acc": found["test_accuracy"], "inner_steps": found.get("test_inner_steps")}
    return None


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Plot train and validation loss and accuracy against the iteration.

    Args:
        run_dir: a run folder holding ``metrics.jsonl``.
        output: the PNG to write; None writes ``RUN_DIR/learning_curves.png``.

    Returns:
        The path of the PNG.

    Raises:
        ConfigError: the folder holds no metrics, or no train row yet; an unknown image format.
        FileError: metrics.jsonl is damaged, or the PNG cannot be written (missing folder, full disk...).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works over ssh and in CI
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: is it a run folder?") from None
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "validation"]
    test = [r for r in rows if r["split"] == "test"]
    if not train:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no training row yet; plot again later")

    config = _read_json(run_dir / "config.json")
    meta = config.get("meta") if isinstance(config.get("meta"), dict) else {}
    train_steps, eval_steps = _steps(meta.get("inner_steps")), _steps(meta.get("test_inner_steps"))
    mark = _test_mark(run_dir, test)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "loss", "query loss after adaptation"),
                           (axes[1], "acc", "query accuracy after adaptation")):
        steps = [r["step"] for r in train]
        values = [r[key] for r in train]
        # an odd window of about a tenth of the rows, at most SMOOTHING_WINDOW
        window = min(SMOOTHING_WINDOW, max(1, len(values) // 10)) // 2 * 2 + 1
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linestyle="none", marker=".", markersize=2,
                label=f"train, {train_steps} (each meta-batch)")
        if window > 1:
            ax.plot(steps, _centred_mean(values, window), color="tab:blue",
                    label=f"train, centred mean of {window} iterations")
        if val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], color="tab:orange", marker="o",
                    markersize=3, label=f"validation, {eval_steps}")
        if mark is not None and mark.get(key) is not None:  # at the iteration of the parameters it tested
            ax.scatter([mark["step"]], [mark[key]], color="tab:red", marker="*", s=80, zorder=3,
                       label=f"test, {_steps(mark['inner_steps']) if mark['inner_steps'] else eval_steps} "
                             f"(iteration {mark['step']})")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[1].set_ylim(0, 1.02)
    preset = config.get("preset") if isinstance(config.get("preset"), str) else None
    name = run_dir.resolve().name
    fig.suptitle(f"{name} ({preset})" if preset and preset != name else name)  # the preset once, not twice
    path = Path(output) if output is not None else run_dir / "learning_curves.png"
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise FileError(describe_os_error(exc, "write the plot", path)) from None
    except ValueError as exc:  # matplotlib: an output name whose extension is no image format it knows
        raise ConfigError(f"cannot write the plot {path}: {exc}; name a .png, .pdf or .svg file") from None
    finally:
        plt.close(fig)
    return path
