"""Copy one evaluated run into ``results/<preset>/``: what the README's Results table is built from.

Reads the run folder only (nothing is re-measured here): ``eval_best.json`` (written by
``metagrad eval RUN --checkpoint best``), ``config.json``, ``metrics.jsonl`` and ``best.pt``. Writes
``results/<preset>/results.json`` (the evaluation's fields, plus the paper's number, the exact command,
the hardware in words and the median seconds per iteration from the training log), copies the config and
the checkpoint, keeps the rows the curves are drawn from (``metrics.jsonl``: step, split, loss and
accuracy to 4 significant digits, about 60 bytes a row, so ``metagrad plot results/<preset>`` re-draws
them) and draws the curves there, with the test result marked.
The published config names no data or cache folder (``null``): those were paths on the machine that
trained, so ``metagrad eval results/<preset> --data-dir DATA`` says where the data is on yours.
The previous ``results.json`` of that preset, if any, is summarised in the new one's ``previous``.

Usage::

    metagrad eval runs/omniglot-maml-5w1s-cpu --checkpoint best --device cpu
    python tools/publish_result.py runs/omniglot-maml-5w1s-cpu \\
        --device "cpu: 2-core AMD EPYC (KVM), 1 thread" \\
        --command \\
        "metagrad train --preset omniglot-maml-5w1s --data-dir DATA --run-dir runs/omniglot-maml-5w1s-cpu"
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from metagrad.plot import plot_run
from metagrad.training.papers import PUBLISHED

COPIED = ("best.pt",)
PLOTTED = ("step", "split", "loss", "acc")  # the metric columns the learning curves need
MACHINE_PATHS = ("data_dir", "cache_dir")  # config's [data] folders, set to null when published


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: {path} is missing; run `metagrad eval {path.parent} --checkpoint best` "
                         f"and `metagrad plot {path.parent}` first") from None


def median_sec_per_iter(metrics: Path) -> float | None:
    """Median of the training rows' ``sec_per_iter`` in ``metrics.jsonl`` (None if there are none)."""
    values = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("split") == "train" and row.get("sec_per_iter") is not None:
            values.append(float(row["sec_per_iter"]))
    return statistics.median(values) if values else None


def _split(config: Any) -> str | None:
    """The config's ``data.split_scheme``, if it names one."""
    data = config.get("data") if isinstance(config, dict) else None
    return data.get("split_scheme") if isinstance(data, dict) else None


def publish(run_dir: Path, results_dir: Path, *, device: str, command: str, paper: str | None = None) -> Path:
    """Write ``results_dir/<preset>/`` from ``run_dir``; returns that folder."""
    evaluation = _read_json(run_dir / "eval_best.json")
    preset = evaluation.get("preset") or _read_json(run_dir / "config.json").get("preset")
    if not preset:
        raise SystemExit(f"error: {run_dir} names no preset; publish only runs of a packaged preset")
    missing = [name for name in ("config.json", "metrics.jsonl", *COPIED) if not (run_dir / name).is_file()]
    if missing:
        raise SystemExit(f"error: {run_dir} lacks {', '.join(missing)}")
    target = results_dir / preset
    old = target / "results.json"
    config = _read_json(run_dir / "config.json")
    previous = None
    if old.is_file():
        before = json.loads(old.read_text(encoding="utf-8"))
        # Another split is another test set: say so, or the two numbers read as comparable.
        old_config = target / "config.json"
        split, old_split = _split(config), _split(_read_json(old_config)) if old_config.is_file() else None
        where = f"on {before.get('device', '?')}"
        if old_split not in (None, split):
            where += f", on the {old_split} split (this one: {split})"
        previous = (f"replaces {before['test_accuracy'] * 100:.2f} +/- {before['test_ci95'] * 100:.2f} after "
                    f"{before.get('iterations', '?')} iterations {where}; see git history")
    result = dict(evaluation)
    result.update({
        "device": device,
        "sec_per_iter_median": median_sec_per_iter(run_dir / "metrics.jsonl"),
        "wall_time_s": evaluation.get("training_wall_time_s"),
        "paper": paper or PUBLISHED.get(preset, "none given"),
        "command": command,
        "previous": previous,
    })
    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(run_dir / name, target / name)
    if isinstance(config.get("data"), dict):
        config["data"].update(dict.fromkeys(MACHINE_PATHS))
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (target / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (target / "metrics.jsonl").write_text(compact_metrics(run_dir / "metrics.jsonl"), encoding="utf-8")
    plot_run(target)  # from the rows just kept, with the test result of results.json marked
    return target


def compact_metrics(metrics: Path) -> str:
    """``metrics.jsonl``'s rows with only the plotted columns, numbers to 4 significant digits."""
    lines = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        kept = {key: row.get(key) for key in PLOTTED}
        kept.update({key: float(f"{kept[key]:.4g}") for key in ("loss", "acc") if kept[key] is not None})
        lines.append(json.dumps(kept, separators=(",", ":")) + "\n")
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="an evaluated and plotted run folder")
    parser.add_argument("--device", required=True, help="the hardware in words, as the table shows it")
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    parser.add_argument("--paper", help="the published number (default: the preset's, from "
                                        "metagrad.training.papers.PUBLISHED)")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    args = parser.parse_args(argv)
    target = publish(args.run_dir, args.results_dir, device=args.device, command=args.command,
                     paper=args.paper)
    print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
