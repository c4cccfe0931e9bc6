"""Time to accuracy on the real Omniglot: metagrad's preset against learn2learn, with its ``maml_omniglot.py``
recipe and with metagrad's.

Both libraries train one after the other on this machine, each in its own process, for ``--budget-s``
seconds of training each. At fixed marks of the training clock (and at 0) each stops, scores the SAME
``--test-tasks`` test tasks and goes on; the evaluation is not counted on the training clock.

The data: metagrad loads the preset's Omniglot splits (``$METAGRAD_DATA``/omniglot, docs/DATA.md) and writes
``data.pt`` in ``--out``: the train split as one uint8 tensor (classes, 20, 1, 28, 28), each rotation a class
of its own, and the test tasks (support and query as float tensors, labels), drawn once with a fixed seed
from the test split. learn2learn reads its images from that file, since its dataset classes need
torchvision and a download.

The recipes:

* metagrad: the preset (``--preset``, default omniglot-maml-5w1s) through its training API: an
  ``EpisodeSampler`` over the train split, ``metagrad.meta_train_step`` with Adam at the preset's meta_lr,
  the schedule of ``metagrad.training.schedule``; test: ``metagrad.evaluate`` with the preset's test-time
  inner loop (``test_inner_steps``). The worker tunes the process as the ``metagrad`` command does
  (OpenMP waiting, the C allocator, the thread count).
* learn2learn 0.2.0, ``examples/vision/maml_omniglot.py`` with its hyper-parameters: ``OmniglotFC(28**2,
  ways)``, ``MAML(lr=0.5, first_order=False)``, Adam(0.003), 32 tasks per meta-batch, 1 adaptation step in
  training and at test, one ``backward()`` per task and the gradients averaged. Two things differ from the
  example, both in learn2learn's favour: its tasks come from tensor indexing into the file's images rather
  than its ``TaskDataset`` of per-image transforms, and the 32 validation and 32 test tasks it adapts every
  iteration for its log are left out.
* learn2learn-cnn: learn2learn 0.2.0 given the metagrad preset's network and recipe, the strongest
  learn2learn baseline: its own ``OmniglotCNN`` (the preset's hidden size and 4 layers; BatchNorm eps 1e-3
  as metagrad's network) in the same ``clone()``/``adapt()`` loop, with the preset's ways, shots, query
  shots, inner rate and steps (test-time steps at test), Adam at its meta_lr (cosine-annealed when the
  preset does, with metagrad's formula), meta-batch size and seed. Presets whose recipe learn2learn's
  ``MAML`` cannot follow (learned inner rates, MAML++'s schedules, ANIL, the MLP) are refused by name.

Outputs in ``--out``: ``<library>.jsonl`` (one line per mark, written as it goes, plus a checkpoint
``<library>.ckpt`` of the latest mark so that an interrupted run resumes from it), ``time_to_accuracy.json``
(the raw numbers), ``time_to_accuracy.md`` (seconds to reach each accuracy level, accuracy at each mark)
and ``time_to_accuracy.png`` (accuracy against training seconds, both curves).

Usage::

    bash benchmarks/setup_peers.sh l2l                            # once: .bench/l2l-venv
    python benchmarks/time_to_accuracy.py --budget-s 3600 --out runs/tta   # about 3 x (1 h + evaluations)
    python benchmarks/time_to_accuracy.py --libraries metagrad learn2learn-cnn --budget-s 1800 --out runs/cnn
    python benchmarks/time_to_accuracy.py --budget-s 60 --marks 20 40 --test-tasks 50 --out /tmp/tta
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LIBRARIES = ("metagrad", "learn2learn", "learn2learn-cnn")
DEFAULT_MARKS = (30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600, 5400, 7200)
DEFAULT_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.975, 0.987)  # 98.7: the MAML paper's 5w1s
L2L_RECIPE = {"ways": 5, "shots": 1, "meta_lr": 0.003, "fast_lr": 0.5, "meta_batch_size": 32,
              "adaptation_steps": 1, "seed": 42}  # examples/vision/maml_omniglot.py's main() defaults


# --- the workers: one library each, in its own process ---------------------------------------------------

def metagrad_config(args: argparse.Namespace) -> Any:
    """metagrad's configuration: ``--preset`` with the ``--set`` overrides (raises ConfigError)."""
    from metagrad.training.config import parse_assignment, resolve_config

    return resolve_config(preset=args.preset, overrides=dict(map(parse_assignment, args.set)))


def preset_recipe(config: Any) -> dict[str, Any]:
    """What learn2learn-cnn takes from metagrad's configuration.

    Raises:
        ValueError: the preset uses something learn2learn's ``MAML`` loop cannot follow (named).
    """
    data, model, meta = config.data, config.model, config.meta
    refused = {
        "model.name (learn2learn-cnn runs learn2learn's OmniglotCNN)": model.name != "omniglot-cnn",
        "model.strided = false (learn2learn's OmniglotCNN has strided convolutions)": not model.strided,
        "meta.algorithm (learn2learn-cnn is MAML or first-order MAML)": meta.algorithm != "maml",
        "meta.learned_inner_lr": meta.learned_inner_lr != "none",
        "meta.iterations_per_epoch / first_order_epochs / msl_epochs / per_step_bn (MAML++)":
            bool(meta.iterations_per_epoch or meta.first_order_epochs or meta.msl_epochs or meta.per_step_bn),
    }
    if any(refused.values()):
        raise ValueError(f"learn2learn-cnn cannot follow preset {config.preset}: "
                         f"{'; '.join(k for k, bad in refused.items() if bad)}")
    return {"ways": data.ways, "shots": data.shots, "query_shots": data.query_shots,
            "hidden_size": model.hidden_size, "inner_lr": meta.inner_lr, "inner_steps": meta.inner_steps,
            "test_inner_steps": meta.test_inner_steps, "first_order": meta.first_order,
            "meta_lr": meta.meta_lr, "lr_schedule": meta.lr_schedule, "min_meta_lr": meta.min_meta_lr,
            "iterations": meta.iterations, "meta_batch_size": meta.meta_batch_size, "seed": config.run.seed}


class Clock:
    """The training clock: evaluates at each mark it passes (off the clock), appends a JSON line per mark and
    checkpoints, so that a restarted worker resumes from its latest mark."""

    def __init__(self, library: str, args: argparse.Namespace) -> None:
        self.library, self.log, self.ckpt = library, Path(args.log), Path(args.log).with_suffix(".ckpt")
        self.marks = sorted(set(args.marks))
        self.budget = args.budget_s
        self.train_s, self.iterations = 0.0, 0

    def resume(self, load: Any) -> Any:
        """Returns the checkpoint's state (after restoring the clock) or None; ``load(path)`` reads it."""
        if not self.ckpt.exists():
            self.log.unlink(missing_ok=True)
            return None
        state = load(self.ckpt)
        self.train_s, self.iterations = state["train_s"], state["iterations"]
        kept = [line for line in self.log.read_text().splitlines()
                if json.loads(line)["train_s"] <= self.train_s]  # rows after the checkpoint are redone
        self.log.write_text("".join(line + "\n" for line in kept))
        print(f"{self.library}: resuming at {self.train_s:.0f} s, iteration {self.iterations}",
              file=sys.stderr)
        return state

    def pending(self) -> list[float]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        done = {json.loads(line)["mark_s"] for line in lines}
        return [m for m in [0.0, *self.marks] if m not in done and m <= self.budget]

    def record(self, mark: float, accs: list[float], eval_s: float, save: Any) -> None:
        n = len(accs)
        mean = sum(accs) / n
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(n - 1, 1))
        row = {"library": self.library, "mark_s": mark, "train_s": self.train_s,
               "iterations": self.iterations, "test_accuracy": mean, "test_ci95": 1.96 * std / math.sqrt(n),
               "test_tasks": n, "eval_s": eval_s}
        save(self.ckpt, {"train_s": self.train_s, "iterations": self.iterations})
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{self.library}: {self.train_s:7.1f} s, {self.iterations:6d} iterations, test accuracy "
              f"{100 * mean:.2f}% (evaluation {eval_s:.1f} s)", file=sys.stderr, flush=True)

    def train(self, step: Any, evaluate: Any, save: Any) -> None:
        """Runs ``step()`` until the budget, calling ``evaluate() -> accuracies`` at each pending mark."""
        for mark in self.pending():
            while self.train_s < mark:
                start = time.perf_counter()
                step()
                self.train_s += time.perf_counter() - start
                self.iterations += 1
            start = time.perf_counter()
            accs = evaluate()
            self.record(mark, accs, time.perf_counter() - start, save)


def metagrad_worker(args: argparse.Namespace) -> None:
    from metagrad.__main__ import tune_before_torch

    tune_before_torch()  # what the `metagrad` command does before torch loads
    import torch

    import metagrad as mg
    from metagrad.cli import tune_compute_process
    from metagrad.data.datasets import FewShotDataset
    from metagrad.training.rates import inner_rates, meta_parameters
    from metagrad.training.schedule import iteration_settings, learning_rate, multi_step_loss_weights
    from metagrad.training.setup import Learner, make_model

    tune_compute_process()  # as the command does: its allocator and thread count
    config = metagrad_config(args)
    data, meta = config.data, config.meta
    files = torch.load(args.data, weights_only=True)
    train = FewShotDataset(data.dataset, "train", files["train_images"],
                           [f"class-{i}" for i in range(files["train_images"].shape[0])])
    sampler = mg.EpisodeSampler(train, data.ways, data.shots, data.query_shots)
    torch.manual_seed(config.run.seed)
    generator = torch.Generator().manual_seed(config.run.seed)
    model = make_model(config.model, data.ways, train.image_shape)
    params = dict(model.named_parameters())
    rates = inner_rates(meta, params, config.run.seed)
    learner = Learner(model, params, {}, rates)
    optimizer = torch.optim.Adam(meta_parameters(params, rates).values(), lr=meta.meta_lr)
    test = mg.Episode(files["support_x"], files["support_y"], files["query_x"], files["query_y"])
    clock = Clock("metagrad", args)

    def save(path: Path, state: dict[str, Any]) -> None:
        torch.save({**state, "model": model.state_dict(), "rates": rates, "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state()}, path)

    state = clock.resume(lambda path: torch.load(path, weights_only=True))
    if state is not None:
        model.load_state_dict(state["model"])
        for name, value in state["rates"].items():
            rates[name].data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    def step() -> None:
        iteration = clock.iterations + 1
        settings = iteration_settings(meta, iteration)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(meta, iteration)
        algorithm = learner.algorithm(settings, step_weights=multi_step_loss_weights(meta, iteration))
        mg.meta_train_step(algorithm, model, optimizer, sampler.sample(meta.meta_batch_size, generator),
                           vectorize=meta.vectorize, max_tasks_per_chunk=meta.tasks_per_chunk or None)

    def evaluate() -> list[float]:
        accs = []
        for start in range(0, test.num_tasks, meta.meta_batch_size):  # bounded memory, as the meta-test
            accs += mg.evaluate(learner.algorithm(meta, test=True), model, dict(model.named_parameters()), {},
                                test.slice(start, start + meta.meta_batch_size)).tolist()
        return accs

    clock.train(step, evaluate, save)


def learn2learn_worker(args: argparse.Namespace) -> None:
    """learn2learn's example as written (``args.worker == "learn2learn"``), or learn2learn with the
    preset's network and recipe (``"learn2learn-cnn"``, ``args.recipe``)."""
    import numpy as np
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE))
    import l2l_baseline

    l2l = l2l_baseline.import_learn2learn()
    from learn2learn.vision.models.cnn4 import OmniglotCNN, OmniglotFC

    conv = args.worker == "learn2learn-cnn"
    if conv:
        preset = json.loads(args.recipe)
        recipe = {"ways": preset["ways"], "shots": preset["shots"], "query_shots": preset["query_shots"],
                  "fast_lr": preset["inner_lr"], "adaptation_steps": preset["inner_steps"],
                  "test_adaptation_steps": preset["test_inner_steps"], "meta_lr": preset["meta_lr"],
                  "meta_batch_size": preset["meta_batch_size"], "seed": preset["seed"],
                  "first_order": preset["first_order"]}
    else:
        recipe = {**L2L_RECIPE, "query_shots": L2L_RECIPE["shots"], "first_order": False,
                  "test_adaptation_steps": L2L_RECIPE["adaptation_steps"]}
    ways, shots, queries = recipe["ways"], recipe["shots"], recipe["query_shots"]
    random.seed(recipe["seed"])
    np.random.seed(recipe["seed"])  # OmniglotFC's initialisation draws from scipy
    torch.manual_seed(recipe["seed"])
    files = torch.load(args.data, weights_only=True)
    images = files["train_images"]  # (classes, samples, 1, 28, 28) uint8
    generator = torch.Generator().manual_seed(recipe["seed"])
    if conv:
        model = OmniglotCNN(output_size=ways, hidden_size=preset["hidden_size"], layers=4)
        for module in model.modules():  # metagrad's network's BatchNorm eps (learn2learn leaves torch's 1e-5)
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 1e-3
    else:
        model = OmniglotFC(28**2, ways)
    maml = l2l.MAML(model, lr=recipe["fast_lr"], first_order=recipe["first_order"])
    opt = torch.optim.Adam(maml.parameters(), recipe["meta_lr"])
    loss = nn.CrossEntropyLoss(reduction="mean")
    clock = Clock(args.worker, args)

    def meta_lr(iteration: int) -> float:
        """metagrad.training.schedule.learning_rate without epochs (preset_recipe refuses those)."""
        if not conv or preset["lr_schedule"] != "cosine":
            return recipe["meta_lr"]
        progress = min((iteration - 1) / preset["iterations"], 1.0)
        floor = preset["min_meta_lr"]
        return floor + (preset["meta_lr"] - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def save(path: Path, state: dict[str, Any]) -> None:
        torch.save({**state, "model": maml.state_dict(), "optimizer": opt.state_dict(),
                    "generator": generator.get_state()}, path)

    state = clock.resume(lambda path: torch.load(path, weights_only=True))
    if state is not None:
        maml.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])

    def sample_task() -> tuple[torch.Tensor, torch.Tensor]:
        """A task as the example's taskset yields it: shots + queries images per class, labels 0..ways-1."""
        classes = torch.randperm(images.shape[0], generator=generator)[:ways]
        samples = torch.stack([torch.randperm(images.shape[1], generator=generator)[: shots + queries]
                               for _ in range(ways)])  # (ways, shots + queries)
        # (ways * (shots + queries), 1, 28, 28)
        data = images[classes[:, None], samples].flatten(0, 1).float() / 255
        return data, torch.arange(ways).repeat_interleave(shots + queries)

    def fast_adapt(adaptation_data, adaptation_labels, evaluation_data, evaluation_labels, learner,
                   steps=recipe["adaptation_steps"]):
        for _ in range(steps):
            learner.adapt(loss(learner(adaptation_data), adaptation_labels))
        predictions = learner(evaluation_data)
        accuracy = (predictions.argmax(dim=1) == evaluation_labels).float().mean()
        return loss(predictions, evaluation_labels), accuracy

    def step() -> None:
        for group in opt.param_groups:
            group["lr"] = meta_lr(clock.iterations + 1)
        opt.zero_grad()
        for _ in range(recipe["meta_batch_size"]):
            learner = maml.clone()
            data, labels = sample_task()
            # The example's split: the first `shots` samples of each class adapt, the others evaluate
            # (with 1 shot and 1 query: even positions adapt, odd ones evaluate, as the example).
            adaptation = (torch.arange(data.shape[0]) % (shots + queries)) < shots
            error, accuracy = fast_adapt(data[adaptation], labels[adaptation], data[~adaptation],
                                         labels[~adaptation], learner)
            error.backward()
            error.item(), accuracy.item()  # the example logs both every task
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / recipe["meta_batch_size"])
        opt.step()

    def evaluate() -> list[float]:
        accs = []
        for task in range(files["support_x"].shape[0]):
            learner = maml.clone()
            _, accuracy = fast_adapt(files["support_x"][task], files["support_y"][task],
                                     files["query_x"][task], files["query_y"][task], learner,
                                     steps=recipe["test_adaptation_steps"])
            accs.append(accuracy.item())
        return accs

    clock.train(step, evaluate, save)


# --- the driver: data file, the two workers one after the other, table, plot -----------------------------

def write_data(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """Writes the train split and the fixed test tasks of ``args.preset``'s Omniglot splits to ``path``."""
    import torch

    import metagrad as mg
    from metagrad.training.setup import load_splits

    config = metagrad_config(args)
    data = config.data
    if args.data_dir:
        from dataclasses import replace

        data = replace(data, data_dir=args.data_dir)
    splits = load_splits(data, ("train", "test"))
    sampler = mg.EpisodeSampler(splits["test"], data.ways, data.shots, data.query_shots)
    test = sampler.sample(args.test_tasks, torch.Generator().manual_seed(args.seed))
    info = {"preset": args.preset, "ways": data.ways, "shots": data.shots, "query_shots": data.query_shots,
            "train_classes": splits["train"].num_classes, "test_classes": splits["test"].num_classes,
            "test_tasks": args.test_tasks, "seed": args.seed}
    torch.save({"train_images": splits["train"].images, "support_x": test.support_x,
                "support_y": test.support_y, "query_x": test.query_x, "query_y": test.query_y, **info}, path)
    return info


def worker_command(library: str, python: str, args: argparse.Namespace) -> list[str]:
    out = Path(args.out)
    recipe = ([] if library != "learn2learn-cnn"
              else ["--recipe", json.dumps(preset_recipe(metagrad_config(args)))])
    return [python, str(Path(__file__).resolve()), "--worker", library, "--data", str(out / "data.pt"),
            "--log", str(out / f"{library}.jsonl"), "--budget-s", str(args.budget_s), "--preset", args.preset,
            "--marks", *map(str, args.marks), *(f"--set={text}" for text in args.set), *recipe]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def seconds_to_reach(rows: list[dict[str, Any]], level: float) -> float | None:
    """Training seconds at the first evaluation whose accuracy reaches ``level`` (None if none does)."""
    return next((r["train_s"] for r in rows if r["test_accuracy"] >= level), None)


def markdown(curves: dict[str, list[dict[str, Any]]], levels: list[float], marks: list[float]) -> str:
    libraries = list(curves)
    # the first mark whose evaluation reaches the level: an upper bound, within one mark's spacing
    lines = ["| accuracy level | " + " | ".join(f"{lib}: training s to reach" for lib in libraries) + " |",
             "| ---: | " + " | ".join("---:" for _ in libraries) + " |"]
    for level in levels:
        cells = [seconds_to_reach(curves[lib], level) for lib in libraries]
        lines.append(f"| {100 * level:g}% | "
                     + " | ".join("not reached" if c is None else f"{c:.0f}" for c in cells) + " |")
    header = " | ".join(f"{lib}: test accuracy (iterations)" for lib in libraries)
    lines += ["", f"| training s (mark) | {header} |",
              "| ---: | " + " | ".join("---:" for _ in libraries) + " |"]
    for mark in [0.0, *marks]:
        cells = []
        for lib in libraries:
            row = next((r for r in curves[lib] if r["mark_s"] == mark), None)
            cells.append("n/a" if row is None else f"{100 * row['test_accuracy']:.2f} ± "
                         f"{100 * row['test_ci95']:.2f}% ({row['iterations']})")
        lines.append(f"| {mark:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for library, rows in curves.items():
        if rows:
            xs = [r["train_s"] for r in rows]
            ys = [100 * r["test_accuracy"] for r in rows]
            ci = [100 * r["test_ci95"] for r in rows]
            ax.errorbar(xs, ys, yerr=ci, marker="o", capsize=3, label=library)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("test accuracy (%), 95% CI")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)  # --set overrides make long titles
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="omniglot-maml-5w1s",
                        help="metagrad's preset (an Omniglot one; default omniglot-maml-5w1s)")
    parser.add_argument("--budget-s", type=float, default=3600,
                        help="training seconds per library (default 3600)")
    parser.add_argument("--threads", type=int,
                        help="intra-op threads of both libraries (OMP_NUM_THREADS; default: torch's choice)")
    parser.add_argument("--marks", type=float, nargs="+",
                        help="training seconds at which to evaluate (default: 30 60 120 300 ... up to the "
                             "budget); the budget itself is always one")
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS),
                        help="accuracy levels of the table (default: "
                             f"{' '.join(f'{level:g}' for level in DEFAULT_LEVELS)})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting of metagrad's preset, as `metagrad train --set` "
                             "(repeatable; learn2learn's recipe is fixed)")
    parser.add_argument("--test-tasks", type=int, default=600, help="test tasks (default 600)")
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES,
                        help="default: all three, without learn2learn-cnn for a preset it cannot follow")
    parser.add_argument("--l2l-python", default=str(HERE.parent / ".bench" / "l2l-venv" / "bin" / "python"),
                        help="a python with learn2learn 0.2.0 (default: setup_peers.sh's .bench/l2l-venv)")
    parser.add_argument("--data-dir", help="data folder (default: the preset's, $METAGRAD_DATA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test tasks (default 0)")
    parser.add_argument("--out", default="runs/time-to-accuracy", help="output folder")
    parser.add_argument("--fresh", action="store_true", help="discard the results and checkpoints in --out")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)  # learn2learn-cnn: preset_recipe as JSON
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.test_tasks < 1:
        parser.error("--budget-s must be positive and --test-tasks at least 1")
    marks = args.marks if args.marks is not None else [m for m in DEFAULT_MARKS if m < args.budget_s]
    if any(m <= 0 for m in marks):
        parser.error("--marks must be positive seconds")
    args.marks = sorted({m for m in marks if m < args.budget_s} | {args.budget_s})
    if not args.worker:  # learn2learn's worker runs in a venv without metagrad
        from metagrad.errors import ConfigError

        try:
            config = metagrad_config(args)
        except ConfigError as error:
            parser.error(str(error))
        if config.data.dataset != "omniglot":
            parser.error(f"--preset {args.preset}: an Omniglot preset is needed (learn2learn's recipe is)")
        try:
            preset_recipe(config)
        except ValueError as error:
            if args.libraries is not None and "learn2learn-cnn" in args.libraries:
                parser.error(str(error))
            args.libraries = args.libraries or ["metagrad", "learn2learn"]
        args.libraries = args.libraries or list(LIBRARIES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        (metagrad_worker if args.worker == "metagrad" else learn2learn_worker)(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"preset": args.preset, "set": args.set, "budget_s": args.budget_s, "marks": args.marks,
                "test_tasks": args.test_tasks, "seed": args.seed, "threads": args.threads}
    settings_path = out / "settings.json"
    if args.fresh or (settings_path.exists() and json.loads(settings_path.read_text()) != settings):
        if not args.fresh:
            print(f"{out} holds a run with other settings; starting afresh", file=sys.stderr)
        for name in ("data.pt", *(f"{lib}.{ext}" for lib in LIBRARIES for ext in ("jsonl", "ckpt"))):
            (out / name).unlink(missing_ok=True)
    settings_path.write_text(json.dumps(settings))
    if not (out / "data.pt").exists():
        print("writing the train split and the test tasks to data.pt", file=sys.stderr, flush=True)
        from metagrad.errors import MetagradError

        try:
            write_data(args, out / "data.pt")
        except MetagradError as error:  # no data: one message naming the fix, not a traceback
            print(f"time_to_accuracy.py: {error}", file=sys.stderr)
            return 2
    pythons = {"metagrad": sys.executable, "learn2learn": args.l2l_python, "learn2learn-cnn": args.l2l_python}
    failures = {}
    for library in args.libraries:
        rows = read_rows(out / f"{library}.jsonl")
        if rows and rows[-1]["mark_s"] == args.marks[-1]:
            print(f"{library}: already complete in {out}", file=sys.stderr)
            continue
        if not Path(pythons[library]).exists():
            failures[library] = f"no {pythons[library]} (run benchmarks/setup_peers.sh l2l)"
            print(f"{library} skipped: {failures[library]}", file=sys.stderr)
            continue
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        proc = subprocess.run(worker_command(library, pythons[library], args), env=env, check=False)
        if proc.returncode != 0:
            failures[library] = f"worker exited {proc.returncode}; run again to resume from its last mark"
            print(f"{library} FAILED: {failures[library]}", file=sys.stderr)
    curves = {lib: read_rows(out / f"{lib}.jsonl") for lib in args.libraries}
    table = markdown(curves, args.levels, args.marks)
    title = f"Omniglot, {args.test_tasks} test tasks: {' '.join([args.preset, *args.set])}"
    if "learn2learn" in curves:  # a metagrad-only run compares with nothing
        title += " vs learn2learn maml_omniglot.py"
    if "learn2learn-cnn" in curves:
        title += " vs learn2learn with the preset's CNN and recipe"
    plot(curves, out / "time_to_accuracy.png", title)
    cnn_recipe = preset_recipe(metagrad_config(args)) if "learn2learn-cnn" in args.libraries else None
    report = {**settings, "levels": args.levels, "l2l_recipe": L2L_RECIPE, "l2l_cnn_recipe": cnn_recipe,
              "curves": curves,
              "seconds_to_reach": {lib: {str(level): seconds_to_reach(rows, level) for level in args.levels}
                                   for lib, rows in curves.items()},
              "failures": failures, "cpus": os.cpu_count()}
    (out / "time_to_accuracy.json").write_text(json.dumps(report, indent=1))
    (out / "time_to_accuracy.md").write_text(table + "\n")
    print(table)
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
