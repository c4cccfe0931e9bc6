"""Learning curves of a run, and runs compared, drawn from their ``metrics.jsonl`` (``metagrad plot``).

Kept out of the training code: plotting reads only the metric rows a run folder holds, so it works on
finished, running and interrupted runs alike, and training never imports matplotlib.
:func:`plot_run` draws one run's curves; :func:`plot_comparison` overlays several runs' validation
accuracy against iterations and against training time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metagrad.data._io import read_json
from metagrad.errors import ConfigError, FileError, MetagradError, describe_os_error
from metagrad.training.config import (
    RESUMABLE_CHANGES,
    Config,
    _flatten,
    config_from_dict,
    config_to_dict,
    load_config_file,
    load_preset,
)
from metagrad.training.metrics import read_metrics

__all__ = ["COMPARISON_NAME", "plot_comparison", "plot_run", "run_labels"]

COMPARISON_NAME = "comparison.png"
"""Where ``metagrad plot RUN RUN ...`` writes without ``--output``: in the current folder."""

NOT_IN_LABELS = RESUMABLE_CHANGES - {"run.device"} | {"run.keep_best"}
"""Settings that do not change what a run computes (folders, how often it saves or logs): never in a
label. The device stays: it changes the training time."""

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
    """A JSON object file's content; {} when it is missing or is not one."""
    try:
        content = read_json(path)
    except (OSError, ValueError, MetagradError):
        return {}
    return content if isinstance(content, dict) else {}


def _preset(run_dir: Path) -> str | None:
    """The preset a run folder's config names, or None."""
    return _read_json(run_dir / "config.json").get("preset")


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
    own = output is None  # the run's own file: replace a link there, never write through it
    return _save(fig, run_dir / "learning_curves.png" if own else Path(output), replace_link=own)


def _settings(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    """A run's preset and its ``section.key`` settings (those that can label it), from its config.json;
    ``(None, {})`` when it has none that this version can read."""
    path = run_dir / "config.json"
    try:
        config = config_from_dict(load_config_file(path), source=str(path))
    except MetagradError:
        return None, {}
    return config.preset, _label_settings(config)


def _label_settings(config: Config) -> dict[str, Any]:
    flat = _flatten(config_to_dict(config))
    return {k: v for k, v in flat.items() if k != "preset" and k not in NOT_IN_LABELS}


def _setting(key: str, value: Any) -> str:
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{key.split('.', 1)[1]}={shown}"


def run_labels(run_dirs: Sequence[str | Path]) -> tuple[list[str], str]:
    """Legend labels for runs compared: each run's preset and the settings in which it differs from it.

    Settings changed alike in every run are left out of the labels and returned as one note (for the
    title); a run's folder name is added where labels would otherwise be equal, and stands alone for a
    folder without a readable config.json.

    Returns:
        ``(labels, note)``, e.g. ``(["omniglot-maml-5w1s: inner_lr=0.1", "omniglot-maml-5w1s"],
        "iterations=2000")``.
    """
    missing = object()
    changes: list[dict[str, Any] | None] = []
    presets: list[str | None] = []
    for run_dir in run_dirs:
        preset, settings = _settings(Path(run_dir))
        presets.append(preset)
        if preset is None:
            changes.append(None)
            continue
        try:
            defaults = _label_settings(load_preset(preset))
        except ConfigError:  # a preset this version does not ship: every setting is the run's own
            defaults = {}
        changes.append({k: v for k, v in settings.items() if defaults.get(k, missing) != v})
    known = [c for c in changes if c is not None]
    first = known[0] if known else {}
    common = {k: v for k, v in first.items() if all(c.get(k, missing) == v for c in known)}
    labels = []
    for run_dir, preset, changed in zip(run_dirs, presets, changes):
        if preset is None or changed is None:
            labels.append(Path(run_dir).resolve().name)
            continue
        own = [_setting(k, v) for k, v in sorted(changed.items()) if k not in common]
        labels.append(preset + (": " + ", ".join(own) if own else ""))
    labels = [f"{label} ({Path(d).resolve().name})" if labels.count(label) > 1 else label
              for label, d in zip(labels, run_dirs)]
    return labels, ", ".join(_setting(k, v) for k, v in sorted(common.items()))


def _validation_curve(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A run's validation rows, each with its ``train_seconds`` (summed from ``sec_per_iter`` for runs
    written before that column), and its last test row."""
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no metrics.jsonl: is it a run folder?") from None
    validation, test, seconds = [], None, 0.0
    for row in rows:
        if row["split"] == "train":
            seconds += row.get("sec_per_iter") or 0.0
        elif row["split"] == "validation":
            validation.append({**row, "train_seconds": row.get("train_seconds") or seconds})
        elif row["split"] == "test":
            test = row
    if not validation:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no validation row yet; plot it later or leave it out")
    return validation, test


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 2 * 3600:
        return "hours", 3600.0
    if seconds >= 120:
        return "minutes", 60.0
    return "seconds", 1.0


def plot_comparison(run_dirs: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Overlay several runs' validation accuracy against iterations and against training time.

    Training time is the wall-clock time of the training steps alone (``train_seconds``: evaluation
    and checkpoints excluded), so runs that validate more or less often compare fairly. Each run is
    labelled by its preset and the settings it changed (:func:`run_labels`), with its test accuracy when
    it has one; a shaded band is the validation accuracy's 95% CI.

    Args:
        run_dirs: run folders holding ``metrics.jsonl``.
        output: the image to write; None writes :data:`COMPARISON_NAME` in the current folder.

    Returns:
        The path of the image.

    Raises:
        ConfigError: a folder holds no metrics, or no validation row yet; an unknown image format.
        FileError: a metrics.jsonl is damaged, or the image cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works over ssh and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    curves = [_validation_curve(Path(run_dir)) for run_dir in run_dirs]
    labels, note = run_labels(run_dirs)
    unit, scale = _time_unit(max(row["train_seconds"] for rows, _ in curves for row in rows))
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True, layout="constrained")
    for i, ((rows, test), label) in enumerate(zip(curves, labels)):
        style = {"color": colors(i % colors.N), "linestyle": ("-", "--", ":", "-.")[i // colors.N % 4]}
        if test is not None:
            ci = test.get("acc_ci95")
            label += f" (test {100 * test['acc']:.1f}" + (f" ± {100 * ci:.1f}%)" if ci is not None else "%)")
        acc = [r["acc"] for r in rows]
        ci95 = [r.get("acc_ci95") for r in rows]
        steps, seconds = [r["step"] for r in rows], [r["train_seconds"] / scale for r in rows]
        for ax, x in ((axes[0], steps), (axes[1], seconds)):
            ax.plot(x, acc, marker="o", markersize=2.5, linewidth=1.2, label=label if ax is axes[0] else None,
                    **style)
            if all(c is not None and math.isfinite(c) for c in ci95):
                ax.fill_between(x, [a - c for a, c in zip(acc, ci95)], [a + c for a, c in zip(acc, ci95)],
                                color=style["color"], alpha=0.12, linewidth=0)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel(f"training time ({unit}; evaluation excluded)")
    axes[0].set_ylabel("validation accuracy")
    for ax in axes:
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
    fig.suptitle(f"validation accuracy of {len(curves)} runs" + (f" (all: {note})" if note else ""))
    fig.legend(loc="outside lower center", ncols=1 if len(curves) <= 4 else 2, fontsize="small",
               frameon=False)
    return _save(fig, Path(output) if output is not None else Path(COMPARISON_NAME))


def _save(fig: Any, path: Path, *, replace_link: bool = False) -> Path:
    """Write ``fig`` to ``path`` and close it; errors as one FileError or ConfigError naming the file."""
    import matplotlib.pyplot as plt

    try:
        if replace_link and path.is_symlink():
            path.unlink()
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise FileError(describe_os_error(exc, "write the plot", path)) from None
    except ValueError as exc:  # matplotlib: an output name whose extension is no image format it knows
        raise ConfigError(f"cannot write the plot {path}: {exc}; name a .png, .pdf or .svg file") from None
    finally:
        plt.close(fig)
    return path
