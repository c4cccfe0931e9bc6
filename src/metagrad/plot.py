"""Learning curves of a run, drawn from its ``metrics.jsonl`` (``metagrad plot``).

Kept out of the training code: plotting reads only the metric rows a run folder holds, so it works on
finished, running and interrupted runs alike, and training never imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from metagrad.data._io import read_json
from metagrad.errors import ConfigError, FileError, describe_os_error
from metagrad.training.metrics import read_metrics

__all__ = ["plot_run"]

SMOOTHING_WINDOW = 50
"""Train rows are noisy (one meta-batch each): a moving average over this many rows is drawn over them."""


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _preset(run_dir: Path) -> str | None:
    try:
        config = read_json(run_dir / "config.json")
        return config.get("preset") if isinstance(config, dict) else None
    except (OSError, ValueError):
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

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "loss", "query loss after adaptation"),
                           (axes[1], "acc", "query accuracy after adaptation")):
        steps = [r["step"] for r in train]
        values = [r[key] for r in train]
        window = min(SMOOTHING_WINDOW, max(1, len(values) // 10))
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _moving_average(values, window), color="tab:blue",
                label=f"train (moving average of {window})" if window > 1 else "train")
        if val:
            ax.plot([r["step"] for r in val], [r[key] for r in val], color="tab:orange", marker="o",
                    markersize=3, label="validation")
        if test:  # drawn at the iteration of the parameters it tested (the best validation accuracy)
            ax.scatter([test[-1]["step"]], [test[-1][key]], color="tab:red", marker="*", s=80, zorder=3,
                       label=f"test (iteration {test[-1]['step']})")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_ylim(0, 1.02)
    preset = _preset(run_dir)
    name = run_dir.resolve().name
    fig.suptitle(f"{name} ({preset})" if preset and preset != name else name)  # the preset once, not twice
    path = Path(output) if output is not None else run_dir / "learning_curves.png"
    try:
        if output is None and path.is_symlink():  # the run's own file: replace a link, never write through
            path.unlink()
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise FileError(describe_os_error(exc, "write the plot", path)) from None
    except ValueError as exc:  # matplotlib: an output name whose extension is no image format it knows
        raise ConfigError(f"cannot write the plot {path}: {exc}; name a .png, .pdf or .svg file") from None
    finally:
        plt.close(fig)
    return path
