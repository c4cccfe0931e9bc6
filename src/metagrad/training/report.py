"""A Markdown table of run folders' results (``metagrad results``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metagrad.data._io import read_json
from metagrad.errors import ConfigError, FileError
from metagrad.training.config import Config, resolve_config
from metagrad.training.metrics import read_metrics
from metagrad.training.papers import PUBLISHED, preset_differences, published_for

__all__ = ["find_runs", "results_table"]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder, or a folder whose subfolders are runs.

    Raises:
        ConfigError: a path does not exist, or holds no run folder at all.
    """
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise ConfigError(
                f"{path} is not a folder; pass run folders or a folder of runs (default: runs/)"
            )
        if (path / "config.json").is_file():
            runs.append(path)
            continue
        found = sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        if not found:
            raise ConfigError(f"{path} holds no run folder (no config.json in it or its subfolders)")
        runs.extend(found)
    return runs


def _row(run_dir: Path) -> dict[str, Any]:
    try:
        config = resolve_config(config_file=run_dir / "config.json")
    except ConfigError as exc:
        return {"run": run_dir.name, "preset": "?", "accuracy": f"(invalid config.json: {exc})",
                "iterations": "", "wall": "", "device": ""}
    # The split names the test classes: the same preset tested on another split is another number.
    row: dict[str, Any] = {"run": run_dir.name, "preset": config.preset, "split": config.data.split_scheme,
                           "paper": _paper(config)}
    results_path = run_dir / "results.json"
    if results_path.is_file():
        try:
            results = read_json(results_path)
            row.update(
                accuracy=f"{100 * results['test_accuracy']:.2f} ± {100 * results['test_ci95']:.2f}",
                tasks=results.get("test_tasks", "?"),
                iterations=(
                    f"{results['iterations']}/{results['iterations_planned']}"  # a run stopped early
                    if results.get("iterations_planned", results["iterations"]) != results["iterations"]
                    else str(results["iterations"])
                ),
                wall=_duration(results["wall_time_s"]) if "wall_time_s" in results else "?",
                device=results.get("device", "?"),
                # published results (tools/publish_result.py) carry the number they were compared with
                paper=results.get("paper") or row["paper"],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a results.json made or edited by hand
            row.update(accuracy=f"(unreadable results.json: {type(exc).__name__} {exc})", iterations="",
                       wall="", device="")
        return row
    # A run still going or interrupted: how far it got, and its best checkpoint's score if
    # `metagrad eval` has measured it.
    try:
        steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    except (FileNotFoundError, FileError):  # no metrics yet, or damaged ones: the row says "0/N" iterations
        steps = []
    row.update(accuracy="(not tested)", iterations=f"{steps[-1] if steps else 0}/{config.meta.iterations}",
               wall="", device="")
    evaluation = _read_json(run_dir / "eval_best.json")
    if evaluation is not None:
        try:
            row.update(
                accuracy=(f"{100 * evaluation['test_accuracy']:.2f} ± {100 * evaluation['test_ci95']:.2f} "
                          f"(eval of best.pt, iteration {evaluation['checkpoint_iteration']})"),
                tasks=evaluation.get("test_tasks", "?"),
                device=evaluation.get("device", "?"),  # the one that ran, not the setting ("auto")
            )
            if evaluation.get("iterations") is not None:
                row["iterations"] = f"{evaluation['iterations']}/{evaluation['iterations_planned']}"
            if evaluation.get("training_wall_time_s") is not None:
                row["wall"] = _duration(evaluation["training_wall_time_s"])
        except (KeyError, TypeError) as exc:
            row["accuracy"] = f"(unreadable eval_best.json: {type(exc).__name__} {exc})"
    return row


def _paper(config: Config) -> str:
    number = published_for(config)
    if number or not PUBLISHED.get(config.preset):
        return number
    differs = preset_differences(config)
    names = ", ".join(differs[:3]) + (", ..." if len(differs) > 3 else "")
    return f"n/a: not the preset ({names})"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def results_table(run_dirs: list[Path]) -> str:
    """A Markdown table, one row per run: preset, split, test accuracy ± 95% CI and the number of test
    tasks it was measured on, iterations, wall time, device.

    When any run gives a published number (its results.json's ``paper``, or its preset's from
    :data:`metagrad.training.papers.PUBLISHED` if it trained the preset unchanged), a column shows it.
    """
    header = ["run", "preset", "split", "test accuracy (%) ± 95% CI", "test tasks", "iterations",
              "wall time", "device"]
    keys = ["run", "preset", "split", "accuracy", "tasks", "iterations", "wall", "device"]
    rows = [_row(run_dir) for run_dir in run_dirs]
    if any(row.get("paper") and not str(row["paper"]).startswith("n/a") for row in rows):
        header.insert(3, "paper (%)")
        keys.insert(3, "paper")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)
