"""TensorBoard and Weights & Biases as mirrors of a run's metric rows (``run.loggers``, ``--logger``).

``metrics.jsonl`` stays the complete record: each logger receives every row it holds, as it is written
(:meth:`MetricsWriter.mirror <metagrad.training.metrics.MetricsWriter.mirror>`), and logs each number
of the row as the scalar ``<split>/<column>`` at the row's step: ``train/loss``, ``train/grad_norm``,
``validation/acc_ci95``, ``train/inner_lr.<name>``... Both are optional extras, imported only here and
only when asked for: ``pip install "metagrad[tensorboard]"`` / ``"metagrad[wandb]"``.

- TensorBoard writes to ``RUN/tensorboard/``, with the resolved config as hyperparameters (the HParams
  tab, with the test accuracy as its metric) and as text. ``tensorboard --logdir runs`` shows every run.
- W&B logs the train and validation rows as history and the test row as the run's summary, with the
  config as the run's config. Without ``WANDB_MODE`` it runs online when an API key is configured
  (``wandb login``, ``WANDB_API_KEY``) and offline otherwise, in ``RUN/wandb/offline-run-*`` (or
  ``$WANDB_DIR/wandb/``): ``wandb sync`` uploads it later. ``run.wandb_project`` names the project (else
  ``$WANDB_PROJECT``, else "metagrad"); ``WANDB_ENTITY``, ``WANDB_MODE``, ``WANDB_NAME`` and W&B's other
  variables apply as usual, but for the run id and resuming, which are metagrad's (``loggers.json``).

Resuming: ``RUN/loggers.json`` records W&B's run id and project and up to which step TensorBoard holds
the rows. A resumed run continues the same TensorBoard log and the same W&B run, each step there once:
TensorBoard drops the rows written after the checkpoint (every session starts with a ``purge_step``);
W&B, which cannot take rows back, keeps those it has (its server's count online, its run files
offline) and is sent only the later ones (the values are the same: a resumed run recomputes them bit
for bit on CPU). A logger added on resume, or after a session without it, is first sent the rows it
missed, from ``metrics.jsonl``. Changing ``run.wandb_project`` starts a new W&B run in that project,
sent the whole run. Under torchrun only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import struct
from pathlib import Path
from typing import Any

from metagrad.data._io import write_text_atomically
from metagrad.errors import ConfigError, FileError, describe_os_error
from metagrad.training.config import Config, _flatten, config_to_dict, logger_names

__all__ = ["STATE_NAME", "TENSORBOARD_DIR", "WANDB_DIR", "check_installed", "open_loggers", "scalars",
           "wandb_history_steps", "wandb_records"]

logger = logging.getLogger(__name__)

STATE_NAME = "loggers.json"
"""The run file that says what each logger holds (see the module docstring)."""

TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's log folder inside the run folder."""

WANDB_DIR = "wandb"
"""W&B's folder inside the run folder (offline runs, W&B's own logs)."""

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The module each logger imports (``pip install "metagrad[<logger>]"`` installs it)."""


def check_installed(loggers: str) -> None:
    """Import the packages the loggers ``run.loggers`` names need, before anything is written.

    Raises:
        ConfigError: a package is missing; the message gives the install command.
    """
    for name in logger_names(loggers):
        try:
            importlib.import_module(_PACKAGES[name])
        except ImportError as exc:
            raise ConfigError(f"--logger {name} needs the {_PACKAGES[name]} package, which cannot be "
                              f"imported ({exc}); install it with: pip install 'metagrad[{name}]'") from None


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A metric row's numbers as ``{"<split>/<column>": value}``: what every logger logs at its step."""
    return {f"{row['split']}/{key}": float(value) for key, value in row.items()
            if key not in ("step", "split") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


def open_loggers(config: Config, run_dir: Path, kept: list[dict[str, Any]], checkpoint_step: int
                 ) -> list[_Logger]:
    """Open the loggers ``config.run.loggers`` names, each sent first the rows it lacks, and record in
    ``RUN/loggers.json`` what each holds.

    Args:
        config: the run's config (its hyperparameters are logged).
        run_dir: the run folder.
        kept: the metric rows the run keeps (``MetricsWriter.kept``: up to the checkpoint resumed from).
        checkpoint_step: the iteration the run resumes from (0 for a new run).

    Returns:
        The loggers, ready for :meth:`MetricsWriter.mirror`.

    Raises:
        ConfigError: a logger cannot start (W&B's message is given), or its folder is a link.
        FileError: ``loggers.json`` cannot be read or written.
    """
    names = logger_names(config.run.loggers)
    for name, folder in (("tensorboard", TENSORBOARD_DIR), ("wandb", WANDB_DIR)):
        if name in names and (run_dir / folder).is_symlink():  # its writes would land outside the run
            raise ConfigError(f"{run_dir / folder} is a link ({os.readlink(run_dir / folder)}): the run "
                              f"writes its {name} log there; replace the link by a folder, or drop --logger "
                              f"{name}")
    path = run_dir / STATE_NAME
    previous = _read_state(path)
    state: dict[str, Any] = {}
    opened: list[_Logger] = []
    try:
        tensorboard = previous.get("tensorboard")
        if "tensorboard" in names:
            held = _tensorboard_held(tensorboard, checkpoint_step)
            state["tensorboard"] = {"held": held, "active": True, "log_dir": TENSORBOARD_DIR}
            mirror: Any = _TensorBoard(run_dir, config, purge_from=held + 1)
            opened.append(_Logger("tensorboard", mirror, held, state, path))
        elif tensorboard is not None:
            state["tensorboard"] = {**tensorboard, "active": False,
                                    "held": _tensorboard_held(tensorboard, checkpoint_step)}
        wandb = previous.get("wandb")
        if wandb is not None and wandb.get("project") != _wandb_project(config):
            wandb = None  # another project: a new W&B run there, sent the whole run
        if "wandb" in names:
            run_id = wandb["id"] if wandb else secrets.token_hex(4)
            earlier = (wandb or {}).get("offline_runs", [])
            mirror = _Wandb(run_dir, config, run_id)
            state["wandb"] = {"active": True, "id": run_id, "project": _wandb_project(config),
                              "mode": mirror.mode, "offline_runs": [*earlier, *mirror.offline_runs]}
            held = mirror.steps_held([run_dir / name for name in earlier])
            opened.append(_Logger("wandb", mirror, held, state, path))
        elif wandb is not None:
            state["wandb"] = {**wandb, "active": False}
        for logger_ in opened:  # first what it missed: the rows of sessions without it
            for row in kept:
                logger_.log(row, replay=True)
        _write_state(path, state)
    except BaseException:
        for logger_ in opened:
            logger_.close()
        raise
    return opened


def _tensorboard_held(before: dict[str, Any] | None, checkpoint_step: int) -> int:
    """Up to which step TensorBoard holds every row: all of them up to the checkpoint resumed from if it
    logged the previous session (it drops those after), else what it held then."""
    if before is None:
        return 0
    return checkpoint_step if before.get("active") else min(int(before.get("held", 0)), checkpoint_step)


class _Logger:
    """A logger as the run sees it: given only the train and validation rows it does not hold yet (W&B
    after a crash keeps the rows it had past the checkpoint; they come again as the run redoes them).

    A logger that fails (a full disk under TensorBoard, W&B's service gone) is turned off with one
    warning, as the progress display is: the run goes on, metrics.jsonl keeps every row, and
    ``loggers.json`` then says what the logger holds, so that the next resume sends it the rest.
    """

    def __init__(self, name: str, mirror: Any, held: int, state: dict[str, Any], state_path: Path) -> None:
        self.name, self.mirror, self.held = name, mirror, held
        self.state, self.state_path = state, state_path
        self.logged = held  # the last train or validation step it was given
        self.failed = False

    def log(self, row: dict[str, Any], replay: bool = False) -> None:
        if self.failed or (replay and row["split"] == "test"):
            return
        if row["split"] != "test" and row["step"] <= self.held:
            return
        try:
            self.mirror.log(row)
        except Exception as exc:  # noqa: BLE001  (whatever the logging library raises: the run goes on)
            self._fail(exc, row["step"])
            return
        if row["split"] != "test":
            self.logged = row["step"]

    def _fail(self, exc: Exception, step: int) -> None:
        self.failed = True
        logger.warning("%s logging stopped at step %d (%s: %s); training goes on and metrics.jsonl has "
                       "every row: --resume later sends the logger the rows it missed", self.name, step,
                       type(exc).__name__, exc)
        # TensorBoard holds what it was given before (a resume drops any later event); W&B says itself
        self.state[self.name] = {**self.state[self.name], "active": False, "held": self.logged}
        try:
            _write_state(self.state_path, self.state)
        except FileError as error:
            logger.warning("%s", error)
        with contextlib.suppress(Exception):
            self.mirror.close()

    def flush(self) -> None:
        if not self.failed:
            try:
                self.mirror.flush()
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, self.logged)

    def close(self) -> None:
        if not self.failed:
            try:
                self.mirror.close()
            except Exception as exc:  # noqa: BLE001
                self._fail(exc, self.logged)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise FileError(describe_os_error(exc, "read", path)) from None
    except ValueError:
        state = None
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise FileError(f"{path} is damaged (not the loggers' JSON record); delete it: the loggers then "
                        "start afresh (a new W&B run, TensorBoard sent every row again)")
    return state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    try:
        write_text_atomically(path, json.dumps(state, indent=2) + "\n")
    except OSError as exc:
        raise FileError(describe_os_error(exc, "write", path)) from None


def _hyperparameters(config: Config) -> dict[str, Any]:
    """The config as flat ``section.key`` hyperparameters (folders left out: they say where, not what)."""
    flat = _flatten(config_to_dict(config))
    return {k: v for k, v in flat.items() if k not in ("data.data_dir", "data.cache_dir", "run.run_dir")}


class _TensorBoard:
    """Scalars in ``RUN/tensorboard/`` through torch's SummaryWriter; the config as hyperparameters."""

    def __init__(self, run_dir: Path, config: Config, *, purge_from: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # Every session starts with a SessionLog START at purge_from; from the second on, TensorBoard
        # drops the earlier events of steps >= purge_from (its server ignores a first START: a new run
        # writes one too)
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_from, flush_secs=10)
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                  for k, v in _hyperparameters(config).items()}
        for summary in hparams(values, {"test/acc": 0.0, "validation/acc": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config_to_dict(config), indent=2) + "\n```",
                             global_step=purge_from)

    def log(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_project(config: Config) -> str:
    return config.run.wandb_project or os.environ.get("WANDB_PROJECT") or "metagrad"


class _Wandb:
    """A W&B run (offline without an API key): train and validation rows as history, the test row as
    its summary, the config as its config."""

    def __init__(self, run_dir: Path, config: Config, run_id: str) -> None:
        import wandb

        self.mode = os.environ.get("WANDB_MODE") or (
            "online" if wandb.login(prompt=False, verify=False) else "offline")
        self.offline = self.mode in ("offline", "dryrun")
        try:
            self.run = wandb.init(
                project=_wandb_project(config), id=run_id, resume="allow", mode=self.mode,
                dir=os.environ.get("WANDB_DIR") or str(run_dir),
                name=os.environ.get("WANDB_NAME") or run_dir.name, config=_hyperparameters(config),
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # noqa: BLE001  (W&B's own errors: no server, a bad key, a bad setting)
            raise ConfigError(f"W&B could not start the run ({type(exc).__name__}: {exc}); log offline with "
                              "WANDB_MODE=offline, or drop --logger wandb") from None
        self.run.config.update(_hyperparameters(config), allow_val_change=True)  # a resume may change some
        sync_dir = Path(self.run.settings.sync_dir)
        self.offline_runs = [os.path.relpath(sync_dir, run_dir) if sync_dir.is_relative_to(run_dir)
                             else str(sync_dir)] if self.offline else []
        if self.offline:
            logger.info("W&B run %s is logged offline; upload it with: wandb sync %s", run_id, sync_dir)
        elif self.mode != "disabled":
            logger.info("W&B run %s", self.run.url)

    def steps_held(self, earlier_offline_runs: list[Path]) -> int:
        """The last step this W&B run already has: the server's (online), else the last one in the earlier
        sessions' offline run files (what ``wandb sync`` uploads; a crash loses what W&B had not flushed)."""
        if not self.offline:
            return max(self.run.starting_step - 1, 0)
        return max((step for folder in earlier_offline_runs for path in folder.glob("run-*.wandb")
                    for step in wandb_history_steps(path)), default=0)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        if row["split"] == "test":  # its step is the tested checkpoint's, before the last: a summary
            self.run.summary.update({**values, "test/step": row["step"]})
        else:
            self.run.log(values, step=row["step"])

    def flush(self) -> None:
        """Nothing: a resume asks W&B's own files what it holds."""

    def close(self) -> None:
        self.run.finish()


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B ``.wandb`` file (an offline run's, as ``wandb sync`` reads it), as protobuf
    ``Record`` messages; a record cut short by a crash is left out.

    The format: a 7-byte header (``:W&B``, magic, version), then LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header (CRC, length, type: full, first, middle or last), a block's tail
    too short for a header being padding.
    """
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise FileError(f"{path} is not a W&B run file")
    records, pending, position = [], b"", header
    while position + header <= len(data):
        if block - position % block < header:
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + header])
        chunk = data[position + header:position + header + length]
        if kind == 0 or len(chunk) < length:  # zeros past the last record, or a chunk cut short
            break
        position += header + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last chunk of a record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_history_steps(path: Path) -> list[int]:
    """The ``_step`` of each history record of a W&B ``.wandb`` file."""
    steps = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            steps += [int(json.loads(item.value_json)) for item in record.history.item
                      if (item.key or "/".join(item.nested_key)) == "_step"]
    return steps
