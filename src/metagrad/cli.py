"""The ``metagrad`` command: argparse -> config -> the library. Nothing else lives here.

Subcommands: ``train``, ``eval``, ``plot``, ``results``, ``presets``, ``data info``, ``data download``,
``bench``, ``check``. stdout carries results only; progress, metric rows and messages go to stderr, and a
closed stdout or stderr never fails a command that did its work (see docs/ROBUSTNESS.md).
Errors the user can fix (:class:`~metagrad.errors.MetagradError`) print ``error: <message>`` on stderr,
without a traceback, and exit with the error's code (2 for a bad configuration, 1 otherwise); argparse
errors (an unknown option, a malformed number) exit 2 as well.

Under torchrun (``torchrun --nproc-per-node N -m metagrad train ...``) rank 0 alone prints progress and
results; the other processes print warnings and errors only, errors marked with their rank.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import functools
import importlib
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import metagrad
from metagrad import _openmp
from metagrad.algorithms.registry import ALGORITHMS
from metagrad.data.datasets import DATASETS
from metagrad.errors import ConfigError, MetagradError, ResultNotSaved, describe_os_error
from metagrad.models import MODELS
from metagrad.training.config import (
    DEFAULT_PRESET,
    LEARNED_INNER_LRS,
    SPLIT_SCHEMES,
    Config,
    load_preset,
    parse_assignment,
    resolve_config,
)
from metagrad.training.distributed import World, world_from_environment

__all__ = ["build_parser", "main"]

logger = logging.getLogger("metagrad")

# (flag, config key, type, help). Defaults come from the preset; the help shows the default preset's value.
_TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--ways", "data.ways", int, "N: classes per task"),
    ("--shots", "data.shots", int, "K: support samples per class"),
    ("--query-shots", "data.query_shots", int, "Q: query samples per class"),
    ("--algorithm", "meta.algorithm", str, ", ".join(ALGORITHMS) + "; Meta-SGD and MAML++ are MAML with "
     "learned rates: their presets (metagrad presets) or --set meta.learned_inner_lr=..."),
    ("--meta-batch-size", "meta.meta_batch_size", int, "tasks per outer step"),
    ("--inner-lr", "meta.inner_lr", float, "inner-loop (adaptation) step size"),
    ("--inner-steps", "meta.inner_steps", int, "inner steps in meta-training"),
    ("--test-inner-steps", "meta.test_inner_steps", int, "inner steps on validation and test tasks"),
    ("--meta-lr", "meta.meta_lr", float, "Adam learning rate of the outer loop"),
    ("--lr-schedule", "meta.lr_schedule", str, "outer learning-rate schedule: constant or cosine"),
    ("--iterations", "meta.iterations", int, "outer steps"),
    ("--tasks-per-chunk", "meta.tasks_per_chunk", int,
     ("at most N tasks back-propagated together, below the automatic chunk (0: all on GPU, "
      "cache-sized on CPU); a small N lowers peak memory at some cost in speed")),
    ("--seed", "run.seed", int, "seed of the model initialization and of every task stream"),
    ("--eval-every", "run.eval_every", int, "validate every this many iterations"),
    ("--eval-tasks", "run.eval_tasks", int, "validation tasks per evaluation"),
    ("--test-tasks", "run.test_tasks", int, "meta-test tasks at the end"),
    ("--checkpoint-every", "run.checkpoint_every", int, "write latest.pt every this many iterations"),
    ("--log-every", "run.log_every", int, "without a terminal, print a train row every this many iterations"),
    ("--dist-timeout", "run.dist_timeout_s", float,
     "under torchrun: seconds a process waits for the others (start-up, each exchange) before the job fails"),
    ("--logger", "run.loggers", str,
     ("also log every metric row to tensorboard (RUN/tensorboard), wandb (offline without an API key) or "
      "tensorboard,wandb; each an extra: pip install 'metagrad[tensorboard]'")),
]
def _either(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


_SET_ONLY: list[tuple[str, str]] = [
    ("data.dataset", _either(list(DATASETS))),
    ("data.rotations", "omniglot: each 90-degree rotation of a character is a class of its own"),
    ("data.folder", "folder: your dataset's folder, DATA_DIR/FOLDER/{train,validation,test}/CLASS/IMAGE"),
    ("data.split_scheme", "; ".join(f"{dataset}: {_either(schemes)}" for dataset, schemes in
                                    SPLIT_SCHEMES.items())),
    ("model.name", _either(list(MODELS))),
    ("model.hidden_size", "filters per conv layer"),
    ("model.strided", "omniglot-cnn: stride-2 convolutions instead of max-pooling"),
    ("model.norm_init", "conv models: BatchNorm's scale starts U[0, 1) (learn2learn) or at 1 (ones)"),
    ("meta.learned_inner_lr", "inner rates meta-learned beside the model: " + _either(list(LEARNED_INNER_LRS))
     + " (Meta-SGD: a rate per parameter element; MAML++'s LSLR: per tensor and step)"),
    ("meta.inner_lr_init_low", "per-parameter rates start uniform in [this, inner_lr); unset: at inner_lr"),
    ("meta.min_meta_lr", "cosine or linear schedule: where the meta learning rate anneals to (MAML++'s CA)"),
    ("data.train_shots", "support samples per class of training tasks (Reptile's train shots); 0: shots"),
    ("meta.inner_optimizer", "reptile: the inner optimizer, adam (beta1 = 0, the paper's code) or sgd"),
    ("meta.inner_batch_size", "reptile: support samples per inner step, cycling through them; 0: all"),
    ("meta.iterations_per_epoch", "an epoch is this many iterations (MAML++'s code: 500); 0: no epochs"),
    ("meta.first_order_epochs", "first order for this many epochs, then second order (MAML++'s DA)"),
    ("meta.msl_epochs", "weigh the query losses after every inner step for this many epochs (MAML++'s MSL)"),
    ("meta.per_step_bn", "a BatchNorm weight and bias per inner step, meta-learned, not adapted (BNWB)"),
    ("run.keep_best", "keep the K best validation checkpoints in RUN/top/ (for metagrad eval --ensemble K)"),
    ("run.wandb_project", "--logger wandb: the W&B project (unset: $WANDB_PROJECT, else metagrad)"),
]
"""(config key, help) of the settings without a flag of their own: ``--set KEY=VALUE`` reaches them."""

_TRAIN_SWITCHES: list[tuple[str, str, str]] = [
    ("--first-order", "meta.first_order", "first-order meta-gradient (no second derivatives)"),
    ("--vectorize", "meta.vectorize", "vmap the meta-batch (--no-vectorize: one task at a time)"),
]


@functools.cache
def _default_config() -> Config:
    return load_preset(DEFAULT_PRESET)


def _default_of(key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(_default_config(), section), name)


def _set_only_epilog() -> str:
    lines = [f"settings without a flag (--set KEY=VALUE; {DEFAULT_PRESET}'s value shown):"]
    for key, text in _SET_ONLY:
        value = _default_of(key)
        shown = str(value).lower() if isinstance(value, bool) else value
        lines.append(f"  {key:<18} {text} ({shown})")
    return "\n".join(lines)


def _user_path(text: str) -> str:
    """A path option with ``~`` expanded: the shell leaves ``--run-dir=~/x`` and quoted paths alone."""
    return os.path.expanduser(text)


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("configuration (preset < --config file < single options)")
    source.add_argument("--preset", metavar="NAME",
                        help=f"named preset (default: the config file's preset, else {DEFAULT_PRESET}); "
                             "`metagrad presets` lists them")
    source.add_argument("--config", metavar="FILE", type=_user_path,
                        help="TOML file with [data] [model] [meta] [run] tables, or a run's config.json "
                             "(repeats that run in a new folder)")
    source.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="assignments",
                        help="set any config value, e.g. --set model.hidden_size=32 (repeatable)")
    folders = parser.add_argument_group("folders and device")
    folders.add_argument("--data-dir", type=_user_path,
                         help="dataset folder (default: $METAGRAD_DATA, else a user data "
                              "folder where the data is downloaded)")
    folders.add_argument("--cache-dir", type=_user_path,
                         help="decoded-dataset cache (default: $METAGRAD_CACHE, else "
                              "$XDG_CACHE_HOME/metagrad)")
    folders.add_argument("--run-dir", type=_user_path, help="run folder (default: runs/<preset>-<timestamp>)")
    folders.add_argument("--device",
                         help="auto, cpu, cuda, cuda:N or mps (default: auto = cuda, then mps, then cpu)")
    options = parser.add_argument_group(
        f"experiment options (default: the preset's value; {DEFAULT_PRESET}'s shown)")
    for flag, key, kind, text in _TRAIN_OPTIONS:
        shown = _default_of(key) if _default_of(key) != "" else "none"
        options.add_argument(flag, type=kind, metavar=kind.__name__.upper(), dest=key,
                             help=f"{text} ({DEFAULT_PRESET}: {shown})")
    for flag, key, text in _TRAIN_SWITCHES:
        options.add_argument(flag, action=argparse.BooleanOptionalAction, dest=key,
                             help=f"{text} ({DEFAULT_PRESET}: {str(_default_of(key)).lower()})")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {key: getattr(args, key) for _, key, _, _ in _TRAIN_OPTIONS}
    overrides.update({key: getattr(args, key) for _, key, _ in _TRAIN_SWITCHES})
    overrides.update({"data.data_dir": args.data_dir, "data.cache_dir": args.cache_dir,
                      "run.run_dir": args.run_dir, "run.device": args.device})
    overrides = {key: value for key, value in overrides.items() if value is not None}
    overrides.update(parse_assignment(text) for text in args.assignments)
    return overrides


# --------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from metagrad.training.loop import run
    from metagrad.training.run_folder import CONFIG_NAME

    config_file = args.config
    if args.resume:
        if args.run_dir is None:
            raise ConfigError("--resume needs the run folder: metagrad train --resume --run-dir DIR")
        if args.config is not None:
            raise ConfigError("--resume continues the run with its own config.json; drop --config")
        config_file = Path(args.run_dir) / CONFIG_NAME
        if not config_file.is_file():
            raise ConfigError(
                f"no run to resume in {args.run_dir} (it holds no {CONFIG_NAME}); "
                f"start a new run with: metagrad train --run-dir {args.run_dir}"
            )
    config = resolve_config(preset=args.preset, config_file=config_file, overrides=_overrides(args))
    try:
        results = run(config, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    except ResultNotSaved as exc:  # the meta-test is done: show its number before the error
        with contextlib.suppress(OSError):  # a closed stdout must not hide the error
            _print_train_result(exc.result)
        raise
    if world_from_environment().is_main:  # under torchrun, rank 0 reports
        _print_train_result(results)
    return 0


def _print_train_result(results: dict[str, Any]) -> None:
    _show_saved(f"test accuracy {100 * results['test_accuracy']:.2f}% ± {100 * results['test_ci95']:.2f}% "
                f"(95% CI over {results['test_tasks']} tasks); run folder {results['run_dir']}")


def _show_saved(text: str) -> None:
    """Print a result that is saved in the run folder too: a stdout that fails (a full disk, a closed
    pipe) loses the line, not the exit status of a command that did its work."""
    try:
        print(text, flush=True)
    except OSError:
        _detach_if_broken(sys.stdout)


def _cmd_eval(args: argparse.Namespace) -> int:
    from metagrad.training.evaluation import evaluate_checkpoint

    if args.ensemble is not None:
        return _cmd_eval_ensemble(args)
    try:
        result = evaluate_checkpoint(args.run_dir, checkpoint=args.checkpoint, test_tasks=args.test_tasks,
                                     device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    except ResultNotSaved as exc:  # eval_<checkpoint>.json could not be written: the number is not lost
        with contextlib.suppress(OSError):  # a closed stdout must not hide the error
            _print_evaluation(args, exc.result)
        raise
    _print_evaluation(args, result)
    return 0


def _cmd_eval_ensemble(args: argparse.Namespace) -> int:
    from metagrad.training.ensemble import evaluate_ensemble

    if args.checkpoint != "best":
        raise ConfigError("--ensemble K scores the K best checkpoints: drop --checkpoint latest")
    try:
        result = evaluate_ensemble(args.run_dir, members=args.ensemble, test_tasks=args.test_tasks,
                                   device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    except ResultNotSaved as exc:
        with contextlib.suppress(OSError):
            _print_ensemble(args, exc.result)
        raise
    _print_ensemble(args, result)
    return 0


def _print_ensemble(args: argparse.Namespace, result: dict[str, Any]) -> None:
    def pct(key: str) -> str:
        return f"{100 * result[key + '_test_accuracy']:.2f}% ± {100 * result[key + '_test_ci95']:.2f}%"

    _show_saved(f"{args.run_dir}: ensemble of the {result['ensemble_members']} best checkpoints "
                f"{pct('ensemble')}, best single checkpoint ({result['single_model_checkpoint']}) "
                f"{pct('single_model')} (95% CI, {result['test_tasks']} tasks, {result['test_inner_steps']} "
                "inner steps)")
    if args.json:
        _show_saved(json.dumps(result))


def _print_evaluation(args: argparse.Namespace, result: dict[str, Any]) -> None:
    _show_saved(f"{args.run_dir} ({args.checkpoint}.pt, iteration {result['checkpoint_iteration']}): test "
                f"accuracy {100 * result['test_accuracy']:.2f}% ± {100 * result['test_ci95']:.2f}% "
                f"(95% CI, {result['test_tasks']} tasks, {result['test_inner_steps']} inner steps)")
    if args.json:
        _show_saved(json.dumps(result))


def _cmd_plot(args: argparse.Namespace) -> int:
    from metagrad.plot import plot_comparison, plot_run

    if len(args.run_dirs) > 1:
        print(plot_comparison(args.run_dirs, args.output))
    else:
        print(plot_run(args.run_dirs[0], args.output))
    return 0


def _cmd_results(args: argparse.Namespace) -> int:
    from metagrad.training.report import find_runs, results_table

    print(results_table(find_runs(args.paths)))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from metagrad.training.config import list_presets, preset_source

    for name in list_presets():
        config = load_preset(name)
        data, meta = config.data, config.meta
        first_order = meta.first_order and meta.algorithm != "fomaml"  # fomaml says so itself
        algorithm = meta.algorithm + (" first order" if first_order else "")
        if meta.learned_inner_lr != "none":
            algorithm += f", learned inner lr {meta.learned_inner_lr}"
        if meta.per_step_bn:
            algorithm += ", per-step BatchNorm"
        queries = f"{data.query_shots} {'query' if data.query_shots == 1 else 'queries'}"
        print(f"{name}  ({preset_source(name)})\n    {data.dataset} {data.ways}-way {data.shots}-shot "
              f"({queries}), {algorithm}, inner lr {meta.inner_lr:g} x {meta.inner_steps} "
              f"({meta.test_inner_steps} at test), meta-batch {meta.meta_batch_size}, "
              f"{meta.iterations:,} iterations, {config.model.name}")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from metagrad.data.datasets import dataset_info

    if args.name == "folder" and args.folder is None:
        raise ConfigError("metagrad data info folder needs the dataset's folder: --folder NAME for "
                          "DATA/NAME/{train,validation,test}/CLASS/IMAGE")
    options = {} if args.split_scheme is None else {"split_scheme": args.split_scheme}
    if args.folder is not None:
        options["folder"] = args.folder
    info = dataset_info(args.name, data_dir=args.data_dir, cache_dir=args.cache_dir, **options)
    print(f"dataset: {info.get('dataset', args.name)}")
    for key, value in info.items():
        if key in ("dataset", "splits"):
            continue
        print(f"{key}: {' x '.join(map(str, value)) if key == 'image_shape' else value}")
    for split, facts in info.get("splits", {}).items():
        details = ", ".join(f"{value} {key.replace('_', ' ')}" for key, value in facts.items())
        print(f"  {split}: {details}")
    if args.json:
        print(json.dumps(info))
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from metagrad.data.datasets import download

    print(download(args.name, data_dir=args.data_dir))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        bench = importlib.import_module("metagrad.bench")
    except ModuleNotFoundError as exc:
        if exc.name != "metagrad.bench":
            raise
        raise MetagradError(
            "metagrad bench is not available: this installation has no metagrad.bench module") from None
    overrides: dict[str, Any] = {"run.device": args.device} if args.device is not None else {}
    if args.tasks_per_chunk is not None:
        overrides["meta.tasks_per_chunk"] = args.tasks_per_chunk
    config = resolve_config(preset=args.preset, config_file=args.config, overrides=overrides)
    if args.check:
        report = bench.check_preset_model(config)
        print(report)
        if not report.ok:
            return 1
    bench.run_bench(config, iterations=args.iterations, json_output=args.json)
    return 0


def _json_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs``: a JSON object of constructor keywords, or nothing."""
    try:
        kwargs = json.loads(text) if text else {}
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"--kwargs is not JSON: {err or 'nested too deeply'}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--kwargs must be a JSON object, e.g. '{\"ways\": 5}'")
    return kwargs


def _user_model(spec: str, kwargs_json: str | None) -> Any:
    """The object named by ``FILE.py:NAME`` or ``MODULE:NAME``, called with ``kwargs_json``'s keywords."""
    import importlib.util

    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise ConfigError(f"model {spec!r}: expected a registered name ({', '.join(sorted(MODELS))}), "
                          "FILE.py:NAME or MODULE:NAME")
    kwargs = _json_kwargs(kwargs_json)
    if location.endswith(".py"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as err:
            raise ConfigError(f"model {spec!r}: cannot import {location}: {err}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"model {spec!r}: {location} has no class or function {name}")
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model {spec!r}: {err}; pass constructor arguments with --kwargs") from None


def _cmd_check(args: argparse.Namespace) -> int:
    from torch import nn

    from metagrad.algorithms.check import check_model
    from metagrad.bench import IMAGE_SHAPES
    from metagrad.models import build_model

    if args.model in MODELS:
        model = build_model(args.model, args.ways, **_json_kwargs(args.kwargs))
        default_shape = IMAGE_SHAPES[{"mini-imagenet-cnn": "mini-imagenet", "cifar-cnn": "cifar-fs"}.get(
            args.model, "omniglot")]
    else:
        model = _user_model(args.model, args.kwargs)
        default_shape = IMAGE_SHAPES["omniglot"]
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {args.model!r} built a {type(model).__name__}, not a torch.nn.Module")
    try:
        shape = tuple(int(n) for n in args.input_shape.split(",")) if args.input_shape else default_shape
    except ValueError:
        raise ConfigError(f"--input-shape {args.input_shape!r}: expected integers like 1,28,28") from None
    report = check_model(model, shape, algorithm=args.algorithm, ways=args.ways, shots=args.shots,
                         query_shots=args.query_shots, tasks=args.tasks, inner_lr=args.inner_lr,
                         inner_steps=args.inner_steps)
    print(report)
    return 0 if report.ok else 1


_COMPUTE_COMMANDS = (_cmd_train, _cmd_eval, _cmd_bench)
"""Commands that run meta-training steps or evaluations: they tune the C allocator first (see
``metagrad._malloc``; ``METAGRAD_MALLOC=default`` turns that off)."""


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------


def _omp_setting() -> str:
    return " ".join(f"{name}={value}" for name, value in _openmp.SETTING.items())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` where an option has a default of its own; keeps descriptions' line breaks.

    Options whose default comes from the preset or the environment say so in their help text instead.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def build_parser() -> argparse.ArgumentParser:
    """The ``metagrad`` argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="metagrad", formatter_class=_HelpFormatter,
        description="Gradient-based meta-learning (MAML, first-order MAML, ANIL, BOIL, Reptile, Meta-SGD, "
                    "MAML++) for few-shot vision, on Omniglot, Mini-ImageNet, CIFAR-FS, FC100, "
                    "tiered-ImageNet, CUB and your own image folders.",
        epilog="environment:\n"
               "  METAGRAD_DATA      dataset folder when --data-dir is not given\n"
               "  METAGRAD_CACHE     decoded-dataset cache when --cache-dir is not given\n"
               "  METAGRAD_MALLOC    how train, eval and bench tune glibc's malloc: unset or 'keep' keeps\n"
               "                     freed memory for reuse (fastest on CPU); 'huge' maps blocks of 16 MB+\n"
               "                     on huge pages (sets THP_MEM_ALLOC_ENABLE=1 before torch loads): less\n"
               "                     peak memory on large images, some speed; 'default' leaves glibc alone\n"
               "  METAGRAD_OMP_WAIT  'default' keeps libgomp's own waiting; otherwise the command sets\n"
               f"                     {_omp_setting()} before torch loads, unless OMP_WAIT_POLICY or\n"
               "                     GOMP_SPINCOUNT is set (how idle CPU threads wait; results unchanged)\n"
               "  METAGRAD_THREADS   N: train, eval and bench use N CPU threads; unset: torch's default\n"
               "                     (one per core), decided once at start",
    )
    parser.add_argument("--version", action="version", version=f"metagrad {metagrad.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", formatter_class=_HelpFormatter, help="meta-train, validate and meta-test in a run folder",
        description="Meta-train, validate and meta-test in a run folder (config.json, metrics.jsonl/csv, "
                    "latest.pt, best.pt, results.json).\n\nexamples:\n"
                    "  metagrad train --data-dir DATA                   # MAML, Omniglot 5-way 1-shot\n"
                    "  metagrad train --preset omniglot-anil-20w1s --iterations 1000\n"
                    "  metagrad train --config runs/X/config.json       # repeat a run in a new folder\n"
                    "  metagrad train --resume --run-dir runs/X         # continue an interrupted run\n"
                    "  torchrun --nproc-per-node 2 -m metagrad train    # 2 data-parallel processes",
    )
    train.epilog = _set_only_epilog()
    _add_train_options(train)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its latest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="start a new run in a --run-dir holding an earlier run's files, replacing them")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no metric lines")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("eval", formatter_class=_HelpFormatter,
                                   help="meta-test a run's checkpoint again (writes eval_<checkpoint>.json)")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", type=_user_path,
                          help="a run folder (metagrad train's --run-dir) or a published results/<preset>")
    evaluate.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                          help="best validation accuracy, or the latest checkpoint")
    evaluate.add_argument("--test-tasks", type=int, metavar="INT", help="test tasks (default: the run's)")
    evaluate.add_argument("--device", help="device (default: the run's setting)")
    evaluate.add_argument("--data-dir", type=_user_path, help="dataset folder (default: the run's setting)")
    evaluate.add_argument("--cache-dir", type=_user_path,
                          help="decoded-dataset cache (default: the run's setting)")
    evaluate.add_argument("--ensemble", type=int, metavar="K",
                          help="score the K best validation checkpoints together: each adapts to a task, the "
                               "prediction is the argmax of their softmax probabilities averaged per query; "
                               "writes eval_ensemble<K>.json and adds the ensemble and best single accuracy "
                               "to results.json (needs a run trained with --set run.keep_best=K or more)")
    evaluate.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    evaluate.set_defaults(func=_cmd_eval)

    plot = commands.add_parser(
        "plot", formatter_class=_HelpFormatter,
        help="learning curves of a run, or several runs compared, as a PNG",
        description="One run: its loss and accuracy curves (default: RUN_DIR/learning_curves.png). Several "
                    "runs: their validation accuracy against iterations and against training time "
                    "(evaluation excluded) in one figure, each labelled by its preset and the settings it "
                    "changed (default: comparison.png in the current folder).")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=_user_path,
                      help="run folders (each holds metrics.jsonl)")
    plot.add_argument("--output", metavar="PNG", type=_user_path,
                      help="output file (default: RUN_DIR/learning_curves.png for one run, comparison.png "
                           "for several)")
    plot.set_defaults(func=_cmd_plot)

    results = commands.add_parser(
        "results", formatter_class=_HelpFormatter, help="Markdown table of run folders' test results",
        description="A Markdown table of run folders' test results (an unfinished run: its `metagrad eval`): "
                    "the split and the number of test tasks each accuracy was measured on, iterations, wall "
                    "time, device, and the published accuracy beside each run that trained a packaged preset "
                    "unchanged (a run whose data, model or algorithm settings differ says which).")
    results.add_argument("paths", nargs="*", default=["runs"], metavar="PATH", type=_user_path,
                         help="run folders, or folders of runs")
    results.set_defaults(func=_cmd_results)

    presets = commands.add_parser(
        "presets", formatter_class=_HelpFormatter, help="list the presets: source and settings of each",
        description="Every packaged preset (metagrad train --preset NAME), the paper its values come from, "
                    "and its main settings in one line.")
    presets.set_defaults(func=_cmd_presets)

    data = commands.add_parser("data", formatter_class=_HelpFormatter, help="inspect or download a dataset")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = data_commands.add_parser(
        "info", formatter_class=_HelpFormatter, help="facts about a dataset",
        description="What a dataset holds: each split's classes and images per class, the image shape.\n\n"
                    "examples:\n"
                    "  metagrad data info omniglot --data-dir DATA\n"
                    "  metagrad data info folder --folder birds --data-dir DATA   # DATA/birds/{train,...}")
    info.add_argument("name", metavar="NAME", help=_either(list(DATASETS)))
    info.add_argument("--folder", metavar="NAME",
                      help="folder only: your dataset's folder under the data folder (config data.folder)")
    info.add_argument("--split-scheme", metavar="SCHEME",
                      help="the class split to count (default: the dataset's; cub: chen or triantafillou)")
    info.add_argument("--data-dir", type=_user_path,
                      help="dataset folder (default: $METAGRAD_DATA, else a user data folder)")
    info.add_argument("--cache-dir", type=_user_path,
                      help="decoded-dataset cache (default: $METAGRAD_CACHE, else "
                           "$XDG_CACHE_HOME/metagrad)")
    info.add_argument("--json", action="store_true",
                      help="also print the facts as one JSON object, last line")
    info.set_defaults(func=_cmd_data_info)
    fetch = data_commands.add_parser("download", formatter_class=_HelpFormatter,
                                     help="download and verify a dataset")
    fetch.add_argument("name", metavar="NAME",
                       help="omniglot or cub (the others have no official download with a checksum)")
    fetch.add_argument("--data-dir", type=_user_path,
                       help="dataset folder (default: $METAGRAD_DATA, else a user data folder)")
    fetch.set_defaults(func=_cmd_data_download)

    bench = commands.add_parser("bench", formatter_class=_HelpFormatter,
                                help="time meta-training steps of a preset on random data")
    bench.add_argument("--preset", default=DEFAULT_PRESET, metavar="NAME",
                       help="preset whose shapes are timed")
    bench.add_argument("--config", metavar="FILE", type=_user_path,
                       help="TOML or JSON config on top of the preset")
    bench.add_argument("--iterations", type=int, default=20, metavar="INT",
                       help="timed iterations after warm-up")
    bench.add_argument("--device", help="device (default: the preset's, auto)")
    bench.add_argument("--tasks-per-chunk", type=int, metavar="INT",
                       help="at most N tasks back-propagated together, below the automatic chunk "
                            "(default: the preset's, 0 = automatic); 1 shows one task's memory")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object, last line")
    bench.add_argument("--check", action="store_true",
                       help="first check in float64 that the preset's model gets exact meta-gradients on the "
                            "path it takes (as `metagrad check`); stop with status 1 if not")
    bench.set_defaults(func=_cmd_bench)

    check = commands.add_parser(
        "check", formatter_class=_HelpFormatter,
        help="check that metagrad's meta-gradients are exact for a model (float64, random tasks)",
        description="Run a model on a small random meta-batch in float64 and compare the meta-gradient (and "
                    "running statistics) of the path metagrad takes for it (batched, vmap or loop) with the "
                    "per-task loop's, first and second order (no finite differences: see docs/EXACTNESS.md). "
                    "Dropout is off on both paths for the comparison, since each path draws its own masks; "
                    "the report says when the model has some. Exit status 1 if the paths differ, or if the "
                    "forward draws other random numbers, which leaves nothing to compare."
                    "\n\nexamples:\n"
                    "  metagrad check omniglot-cnn\n"
                    "  metagrad check my_models.py:ResNet12 --kwargs '{\"ways\": 5}' --input-shape 3,84,84")
    check.add_argument("model", metavar="MODEL",
                       help="a registered model name, FILE.py:NAME or MODULE:NAME (a class or function)")
    check.add_argument("--kwargs", metavar="JSON", help="keyword arguments for MODEL's constructor")
    check.add_argument("--input-shape", metavar="C,H,W",
                       help="one input's shape (default: 1,28,28; 3,84,84 for mini-imagenet-cnn; "
                            "3,32,32 for cifar-cnn)")
    check.add_argument("--algorithm", default="maml", choices=tuple(ALGORITHMS),
                       help="algorithm to check")
    check.add_argument("--ways", type=int, default=5, metavar="INT", help="classes per random task")
    check.add_argument("--shots", type=int, default=2, metavar="INT", help="support samples per class")
    check.add_argument("--query-shots", type=int, default=2, metavar="INT", help="query samples per class")
    check.add_argument("--tasks", type=int, default=3, metavar="INT", help="tasks in the random meta-batch")
    check.add_argument("--inner-steps", type=int, default=2, metavar="INT", help="inner steps")
    check.add_argument("--inner-lr", type=float, default=0.1, metavar="FLOAT", help="inner step size")
    check.set_defaults(func=_cmd_check)
    return parser


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def _rank_note(world: World) -> str:
    return f" (rank {world.rank} of {world.size})" if world.size > 1 else ""


THREADS_VAR = "METAGRAD_THREADS"
"""``METAGRAD_THREADS=N``: train, eval and bench use N CPU threads; unset, torch's default (one per core the
process may run on), decided once at start whatever else the machine runs."""


def tune_compute_process() -> None:
    """What train, eval and bench do to the process first, once: glibc's malloc (``metagrad._malloc``:
    freed blocks kept, or large ones on huge pages, so not faulted in again every step) and the CPU
    thread count (``THREADS_VAR``)."""
    from metagrad import _malloc

    _malloc.tune()
    wanted = os.environ.get(THREADS_VAR, "").strip()
    if wanted and wanted != "fixed":  # "fixed": torch's default, as before the count was decided once
        if not wanted.isdigit() or int(wanted) < 1:
            raise ConfigError(f"{THREADS_VAR}={wanted!r} is not a positive number of threads; unset it for "
                              "torch's default")
        import torch

        torch.set_num_threads(int(wanted))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``metagrad`` command.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, the error's ``exit_code`` for a :class:`MetagradError`,
        2 for a command-line error, 128 + N when signal N stopped training (after a checkpoint).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        world = world_from_environment()
    except ConfigError as exc:
        _say(f"error: {exc}", sys.stderr)
        return exc.exit_code
    restore_errors = _spell_what_streams_cannot_encode()
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_LevelFormatter("%(message)s"))
    logger.addHandler(handler)
    previous_level = logger.level
    quiet = getattr(args, "quiet", False) or not world.is_main
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO)
    try:
        if args.func in _COMPUTE_COMMANDS:
            tune_compute_process()
        return args.func(args)
    except MetagradError as exc:
        from metagrad.training.signals import TrainingInterrupted

        prefix = "interrupted" if isinstance(exc, TrainingInterrupted) else "error"
        _say(f"{prefix}{_rank_note(world)}: {exc}", sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # stdout piped into e.g. `head`, which stopped reading, after all was saved
        return 0
    except OSError as exc:  # a read or write that no layer below turned into a message of its own
        _say(f"error{_rank_note(world)}: {describe_os_error(exc, 'read or write')}", sys.stderr)
        return 1
    except KeyboardInterrupt:
        _say("interrupted", sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        for stream in (sys.stdout, sys.stderr):
            _detach_if_broken(stream)
        restore_errors()


_ASCII_SPELLINGS = {"±": "+/-", "×": "x", "…": "...", "—": "--", "–": "-"}


def _in_ascii(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: characters an output encoding lacks, spelled in ASCII (``±`` as ``+/-``,
    others as ``\\uXXXX`` escapes), so that ``PYTHONIOENCODING=ascii`` or a latin-1 terminal never
    turns a finished command into a UnicodeEncodeError."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    spelled = (_ASCII_SPELLINGS.get(c) or c.encode("ascii", "backslashreplace").decode() for c in text)
    return "".join(spelled), exc.end


def _spell_what_streams_cannot_encode() -> Callable[[], None]:
    """Make stdout and stderr spell what their encoding lacks (:func:`_in_ascii`); returns the undo."""
    codecs.register_error("metagrad.ascii", _in_ascii)
    undo = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and not stream.closed:
            undo.append((stream, stream.errors))
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="metagrad.ascii")

    def restore() -> None:
        for stream, errors in undo:
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors=errors)

    return restore


class _StderrHandler(logging.StreamHandler):
    """Log records on stderr; a stderr that cannot be written loses the records, never the run."""

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def _say(text: str, stream: TextIO) -> None:
    """Print a line that must not become a second error (the stream's reader may be gone)."""
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass


def _detach_if_broken(stream: TextIO) -> None:
    """Flush ``stream``; if it cannot be written, point its descriptor at /dev/null.

    Python flushes stdout and stderr at exit and turns a failure there into exit status 120 and a
    message: a closed pipe must not change the status of a command that did its work.
    """
    try:
        stream.flush()
    except (OSError, ValueError):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (OSError, ValueError):
            pass
