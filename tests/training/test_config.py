"""Configs: presets and their paper values, precedence, files, and every invalid value."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from metagrad.algorithms import ALGORITHMS
from metagrad.errors import ConfigError
from metagrad.training import Config, load_preset, resolve_config
from metagrad.training.config import (
    DEFAULT_PRESET,
    absolute_folders,
    check_resume_compatible,
    config_to_dict,
    list_presets,
    parse_assignment,
    save_config,
)

PRESETS = [
    f"omniglot-{algorithm}-{ways}w{shots}s"
    for algorithm in ("maml", "anil", "fomaml") for ways in (5, 20) for shots in (1, 5)
] + [f"mini-imagenet-{algorithm}-5w{shots}s" for algorithm in ("maml", "anil") for shots in (1, 5)]

META_SGD_PRESETS = ["omniglot-metasgd-5w1s", "omniglot-metasgd-20w1s", "mini-imagenet-metasgd-5w1s",
                    "mini-imagenet-metasgd-5w5s"]

MAMLPP_PRESETS = [f"omniglot-mamlpp-{ways}w{shots}s" for ways in (5, 20) for shots in (1, 5)] + [
    f"mini-imagenet-mamlpp-5w{shots}s" for shots in (1, 5)]


BENCHMARK_PRESETS = [f"{dataset}-{algorithm}-5w{shots}s"
                     for dataset in ("cifar-fs", "fc100", "tiered-imagenet", "cub")
                     for algorithm in ("maml", "anil") for shots in (1, 5)]

OWN_PRESETS = ["omniglot-maml-5w1s-fast"]

BOIL_PRESETS = ["omniglot-boil-5w1s", "mini-imagenet-boil-5w1s", "mini-imagenet-boil-5w5s"]

REPTILE_PRESETS = [f"omniglot-reptile-{shape}" for shape in ("5w1s", "5w5s", "20w1s")] + [
    f"mini-imagenet-reptile-5w{shots}s" for shots in (1, 5)]

# The commands of github.com/openai/supervised-reptile's README: (inner batch, inner iterations, Adam's
# learning rate, meta-batch, meta-iterations, train shots)
REPTILE_COMMANDS = {"omniglot-reptile-5w1s": (10, 5, 0.001, 5, 100_000, 10),
                    "omniglot-reptile-5w5s": (10, 5, 0.001, 5, 100_000, 10),
                    "omniglot-reptile-20w1s": (20, 10, 0.0005, 5, 200_000, 10),
                    "mini-imagenet-reptile-5w1s": (10, 8, 0.001, 5, 100_000, 15),
                    "mini-imagenet-reptile-5w5s": (10, 8, 0.001, 5, 100_000, 15)}

FAST_OVERRIDES = {"meta.meta_batch_size": 16, "meta.meta_lr": 0.003, "meta.lr_schedule": "cosine",
                  "meta.min_meta_lr": 0.0001, "meta.iterations": 10000}
"""What omniglot-maml-5w1s-fast changes in the paper's preset: the settings docs/PERFORMANCE.md's time to
accuracy was measured with (`--preset omniglot-maml-5w1s --set ...`)."""


def test_every_preset_of_the_issue_is_packaged() -> None:
    assert list_presets() == sorted(PRESETS + META_SGD_PRESETS + MAMLPP_PRESETS + BENCHMARK_PRESETS
                                    + OWN_PRESETS + BOIL_PRESETS + REPTILE_PRESETS)


@pytest.mark.parametrize("name", REPTILE_PRESETS)
def test_reptile_presets_follow_the_papers_commands(name: str) -> None:
    config = load_preset(name)
    data, meta = config.data, config.meta
    ways, shots = (int(part) for part in name.split("-")[-1][:-1].split("w"))
    assert (data.ways, data.shots, data.query_shots, meta.algorithm) == (ways, shots, 1, "reptile")
    assert (meta.inner_batch_size, meta.inner_steps, meta.inner_lr, meta.meta_batch_size, meta.iterations,
            data.train_shots) == REPTILE_COMMANDS[name]
    assert (meta.inner_optimizer, meta.meta_lr) == ("adam", 1.0)
    assert (meta.lr_schedule, meta.min_meta_lr) == ("linear", 0)
    assert meta.test_inner_steps == 50


@pytest.mark.parametrize("name", BOIL_PRESETS)
def test_boil_presets_adapt_the_body_with_the_papers_step(name: str) -> None:
    config = load_preset(name)
    assert (config.meta.algorithm, config.meta.inner_lr, config.meta.inner_steps) == ("boil", 0.5, 1)
    if name.startswith("mini-imagenet"):
        assert (config.model.name, config.model.hidden_size) == ("mini-imagenet-cnn", 64)  # Conv64F


@pytest.mark.parametrize("name", BENCHMARK_PRESETS)
def test_benchmark_presets_pair_each_dataset_with_its_network_and_split(name: str) -> None:
    config = load_preset(name)
    data, model, meta = config.data, config.model, config.meta
    dataset, algorithm = name.split("-5w")[0].rsplit("-", 1)
    shots = int(name[-2])
    assert (data.dataset, data.ways, data.shots, data.query_shots, meta.algorithm) == (
        dataset, 5, shots, 15, algorithm)
    assert (model.name, data.split_scheme) == {
        "cifar-fs": ("cifar-cnn", "bertinetto"), "fc100": ("cifar-cnn", "oreshkin"),
        "tiered-imagenet": ("mini-imagenet-cnn", "ren"), "cub": ("mini-imagenet-cnn", "chen")}[dataset]
    assert meta.inner_lr == {"maml": 0.01, "anil": 0.05}[algorithm]
    assert meta.meta_batch_size == (4 if shots == 1 else 2)


def test_the_fast_preset_is_the_papers_network_and_inner_loop_with_a_faster_outer_loop() -> None:
    fast = load_preset("omniglot-maml-5w1s-fast")
    measured = resolve_config(preset="omniglot-maml-5w1s", overrides=FAST_OVERRIDES)
    assert dataclasses.replace(fast, preset="omniglot-maml-5w1s") == measured


@pytest.mark.parametrize("name", MAMLPP_PRESETS)
def test_mamlpp_presets_follow_the_reference_configs(name: str) -> None:
    # experiment_config/*maml++*.json of github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch
    config = load_preset(name)
    data, model, meta = config.data, config.model, config.meta
    ways, shots = (int(part) for part in name.split("-")[-1][:-1].split("w"))
    assert (data.ways, data.shots) == (ways, shots)
    # every MAML++ option on: LSLR, BNWB, MSL, epochs, second order from the start (DA at -1)
    assert (meta.algorithm, meta.first_order, meta.first_order_epochs) == ("maml", False, 0)
    assert (meta.learned_inner_lr, meta.per_step_bn) == ("per-layer-per-step", True)
    assert (meta.inner_steps, meta.test_inner_steps, meta.meta_lr) == (5, 5, 0.001)
    assert (meta.iterations_per_epoch, meta.iterations) == (500, 50_000)
    assert (model.strided, model.norm_init, config.run.eval_every, config.run.test_tasks) == (
        False, "ones", 500, 600)
    assert config.run.keep_best == 5  # max_models_to_save: the paper's top-5 test ensemble
    if name.startswith("omniglot"):
        assert (data.query_shots, model.name, model.hidden_size) == (1, "omniglot-cnn", 64)
        assert (meta.meta_batch_size, meta.inner_lr, meta.msl_epochs) == (8, 0.1, 10)
        assert (meta.lr_schedule, meta.min_meta_lr) == ("cosine", 0.00001)
    else:
        assert (data.query_shots, model.name, model.hidden_size) == (15, "mini-imagenet-cnn", 48)
        assert (meta.meta_batch_size, meta.inner_lr, meta.msl_epochs) == (2, 0.01, 15)
        assert meta.lr_schedule == "constant"  # the code's cosine goes from 0.001 to 0.001


@pytest.mark.parametrize("name", PRESETS)
def test_preset_values_follow_the_papers(name: str) -> None:
    config = load_preset(name)
    data, model, meta = config.data, config.model, config.meta
    algorithm = name.split("-")[-2]
    assert config.preset == name
    assert meta.algorithm == ("maml" if algorithm == "fomaml" else algorithm)  # fomaml: MAML, first order
    assert meta.first_order == (algorithm == "fomaml")
    assert (meta.meta_lr, meta.test_inner_steps, meta.iterations) == (0.001, 10, 60_000)
    assert (meta.lr_schedule, meta.vectorize) == ("constant", True)
    if name.startswith("omniglot"):
        ways, shots = (int(part) for part in name.split("-")[-1][:-1].split("w"))
        assert (data.dataset, data.ways, data.shots, data.query_shots) == ("omniglot", ways, shots, shots)
        assert data.rotations and data.split_scheme == "shuffled"  # the papers' protocol
        assert (model.name, model.hidden_size, model.strided) == ("omniglot-cnn", 64, True)
        batch, lr, steps = (32, 0.4, 1) if ways == 5 else (16, 0.1, 5)
        if algorithm == "anil":
            # ANIL takes the papers' step on the reference code's loss (summed over the N classes), i.e.
            # N times it on the mean loss metagrad differentiates; MAML keeps the papers' value.
            lr *= ways
        expected = (batch, lr, steps)
        assert (meta.meta_batch_size, meta.inner_lr, meta.inner_steps) == pytest.approx(expected)
    else:
        shots = int(name[-2])
        assert (data.dataset, data.ways, data.shots, data.query_shots) == ("mini-imagenet", 5, shots, 15)
        assert not data.rotations and data.split_scheme == "ravi"
        assert (model.name, model.hidden_size, model.strided) == ("mini-imagenet-cnn", 32, False)
        lr = 0.01 * 5 if algorithm == "anil" else 0.01
        assert ((meta.meta_batch_size, meta.inner_lr, meta.inner_steps)
                == pytest.approx((4 if shots == 1 else 2, lr, 5)))


@pytest.mark.parametrize("name", META_SGD_PRESETS)
def test_meta_sgd_presets_are_maml_presets_with_learned_rates(name: str) -> None:
    config = load_preset(name)
    maml = load_preset(name.replace("metasgd", "maml"))
    assert (config.data, config.model) == (maml.data, maml.model)
    meta = config.meta
    assert (meta.algorithm, meta.first_order, meta.learned_inner_lr) == ("maml", False, "per-parameter")
    rates_and_steps = (meta.inner_lr, meta.inner_lr_init_low, meta.inner_steps, meta.test_inner_steps)
    assert rates_and_steps == (0.1, 0.005, 1, 1)
    assert (meta.meta_lr, meta.meta_batch_size, meta.iterations) == (0.001, maml.meta.meta_batch_size, 60_000)


@pytest.mark.parametrize("name", PRESETS + META_SGD_PRESETS + MAMLPP_PRESETS)
def test_every_preset_cites_its_source(name: str) -> None:
    from importlib import resources

    text = (resources.files("metagrad") / "configs" / f"{name}.toml").read_text()
    assert "# Source:" in text and "Table" in text


def test_dataclass_defaults_are_the_default_preset() -> None:
    assert Config() == load_preset(DEFAULT_PRESET)


def test_precedence_preset_then_file_then_overrides(tmp_path: Path) -> None:
    file = tmp_path / "exp.toml"
    file.write_text('preset = "omniglot-maml-20w1s"\n[meta]\ninner_lr = 0.2\ninner_steps = 3\n'
                    '[run]\nseed = 7\n')
    config = resolve_config(config_file=file, overrides={"meta.inner_steps": 2})
    assert config.preset == "omniglot-maml-20w1s"  # the file's preset is the base
    assert config.data.ways == 20 and config.meta.meta_batch_size == 16  # from the preset
    assert config.meta.inner_lr == 0.2 and config.run.seed == 7  # from the file
    assert config.meta.inner_steps == 2  # the override wins
    # An explicit preset replaces the file's.
    assert resolve_config(preset="omniglot-anil-5w1s", config_file=file).data.ways == 5


def test_config_json_repeats_the_run(tmp_path: Path) -> None:
    config = resolve_config(preset="omniglot-fomaml-20w5s",
                            overrides={"meta.iterations": 123, "run.seed": 5, "run.run_dir": str(tmp_path)})
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "run_dir" not in saved["run"]  # a repeat goes to a new folder
    again = resolve_config(config_file=tmp_path / "config.json")
    assert again == dataclasses.replace(config, run=dataclasses.replace(config.run, run_dir=None))


def test_int_widens_to_float_and_types_are_checked() -> None:
    assert resolve_config(overrides={"meta.inner_lr": 1}).meta.inner_lr == 1.0
    with pytest.raises(ConfigError, match=r"meta.iterations must be int, got True"):
        resolve_config(overrides={"meta.iterations": True})
    with pytest.raises(ConfigError, match=r"meta.first_order must be bool, got 'yes'"):
        resolve_config(overrides={"meta.first_order": "yes"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("meta.inner_lr=0.1", ("meta.inner_lr", 0.1)), ("run.seed=3", ("run.seed", 3)),
     ("meta.vectorize=false", ("meta.vectorize", False)),
     ("data.dataset=omniglot", ("data.dataset", "omniglot")),
     ('run.device="cpu"', ("run.device", "cpu"))],
)
def test_parse_assignment(text: str, expected: tuple) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["inner_lr=0.1", "meta.inner_lr", "a.b.c=1"])
def test_parse_assignment_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        parse_assignment(text)


BAD_OVERRIDES = [
    ({"data.ways": 0}, "data.ways .* must be positive, got 0"),
    ({"data.shots": -1}, "data.shots .* must be positive, got -1"),
    ({"data.query_shots": 0}, "data.query_shots .* must be positive"),
    ({"data.dataset": "cifar"}, "unknown dataset 'cifar'; valid datasets: omniglot, mini-imagenet"),
    ({"data.split_scheme": "random"},
     "split_scheme 'random' is not one of omniglot's: maml, vinyals, shuffled"),
    ({"data.dataset": "mini-imagenet", "data.rotations": True}, "rotations applies to omniglot only"),
    ({"model.name": "resnet"}, "unknown model 'resnet'; valid models: omniglot-cnn"),
    ({"model.hidden_size": 0}, "model.hidden_size must be positive"),
    ({"model.name": "mini-imagenet-cnn"}, "strided applies to omniglot-cnn only"),
    ({"model.norm_init": "zeros"}, "unknown model.norm_init 'zeros'; valid: learn2learn, ones"),
    ({"model.name": "omniglot-fc", "model.strided": False, "model.norm_init": "ones"},
     "norm_init applies to omniglot-cnn, mini-imagenet-cnn and cifar-cnn only"),
    ({"meta.algorithm": "imaml"}, "unknown algorithm 'imaml'; valid algorithms: " + ", ".join(ALGORITHMS)),
    ({"meta.inner_lr": 0.0}, r"meta.inner_lr \(--inner-lr\) must be positive, got 0.0"),
    ({"meta.inner_lr": -0.4}, "inner_lr .* must be positive"),
    ({"meta.inner_lr": float("nan")}, "inner_lr .* must be positive, got nan"),
    ({"meta.meta_lr": float("inf")}, "meta_lr .* must be positive, got inf"),
    ({"meta.meta_lr": 0}, "meta_lr .* must be positive"),
    ({"meta.inner_steps": 0}, "inner_steps .* must be positive"),
    ({"meta.test_inner_steps": 0}, "test_inner_steps .* must be positive"),
    ({"meta.meta_batch_size": 0}, "meta_batch_size .* must be positive"),
    ({"meta.iterations": -5}, "iterations .* must be positive"),
    ({"meta.lr_schedule": "step"}, "unknown lr_schedule 'step'; valid: constant, cosine"),
    ({"meta.tasks_per_chunk": -1},
     r"tasks_per_chunk \(--tasks-per-chunk\) must be 0 \(automatic\) or a number"),
    ({"run.seed": -1}, r"seed \(--seed\) must be in"),
    ({"run.device": "tpu"}, "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ({"run.eval_every": 0}, "eval_every .* must be positive"),
    ({"run.eval_tasks": 0}, "eval_tasks .* must be positive"),
    ({"run.test_tasks": 1}, "test_tasks .* must be at least 2"),
    ({"run.checkpoint_every": 0}, "checkpoint_every .* must be positive"),
    ({"run.log_every": 0}, "log_every .* must be positive"),
    ({"run.dist_timeout_s": 0}, r"dist_timeout_s \(--dist-timeout\) must be positive"),
    ({"meta.inner_lrr": 0.1}, r"unknown setting meta.inner_lrr .*valid \[meta\] settings: algorithm"),
    ({"optim.lr": 0.1}, "unknown setting 'optim.lr'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES)
def test_bad_values_raise_config_error(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=overrides)


def test_fomaml_loads_as_first_order_maml() -> None:
    # "fomaml", the old name for first-order MAML, still loads: as MAML with first_order, whatever it says
    for first_order in (False, True):
        meta = resolve_config(overrides={"meta.algorithm": "fomaml", "meta.first_order": first_order}).meta
        assert (meta.algorithm, meta.first_order) == ("maml", True)
    assert "fomaml" not in ALGORITHMS


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError,
                       match="unknown preset 'omniglot-maml-5w2s'; valid presets: cifar-fs-anil-5w1s"):
        load_preset("omniglot-maml-5w2s")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("bad.toml", "[meta\ninner_lr = ", "is not valid TOML"),
     ("bad.json", "{", "is not valid JSON"),
     ("list.json", "[1, 2]", "must hold a table of sections"),
     ("section.toml", "[optim]\nlr = 1", "unknown section 'optim'"),
     ("flat.toml", "meta = 3", r"\[meta\] must be a table"),
     ("preset.toml", "preset = 3", "preset must be a string")],
)
def test_bad_config_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
        resolve_config(config_file=tmp_path / name)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [("latin1.toml", "[run]\nseed = 1 # caf\xe9\n".encode("latin-1"), r"is not UTF-8 text \(byte 20\)"),
     ("binary.json", bytes(range(256)), "is not UTF-8 text"),
     ("deep.json", b"[" * 100_000, "nested too deeply"),
     ("deep.toml", b"a = " + b"[" * 100_000, "nested too deeply"),
     ("folder.toml", None, "is not a regular file"),
     ("huge.toml", b"# " + b"x" * (1 << 20), "more than a config file can be")],
)
def test_config_files_that_used_to_crash_the_parser(tmp_path: Path, name: str, content: bytes | None,
                                                   message: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{name}.*{message}|{message}.*{name}"):
        resolve_config(config_file=path)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_as_config_file_is_not_read() -> None:
    with pytest.raises(ConfigError, match="/dev/zero is not a regular file"):  # it would never end
        resolve_config(config_file="/dev/zero")


@pytest.mark.parametrize("name", ["bom.toml", "bom.json"])
def test_a_byte_order_mark_is_accepted(tmp_path: Path, name: str) -> None:
    text = '[meta]\ninner_lr = 0.25\n' if name.endswith(".toml") else '{"meta": {"inner_lr": 0.25}}'
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    assert resolve_config(config_file=tmp_path / name).meta.inner_lr == 0.25


def test_a_section_that_is_not_a_table_with_an_option_for_it(tmp_path: Path) -> None:
    (tmp_path / "flat.toml").write_text("data = 5\n")
    with pytest.raises(ConfigError, match=r"\[data\] must be a table of settings, not 5 \(in .*flat.toml\)"):
        resolve_config(config_file=tmp_path / "flat.toml", overrides={"data.ways": 3})
    with pytest.raises(ConfigError, match="--set expects"):
        parse_assignment("data.ways")
    assert parse_assignment("data.ways=" + "[" * 100_000)[0] == "data.ways"  # a string, not a crash


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*missing.toml"):
        resolve_config(config_file=tmp_path / "missing.toml")


def test_resume_may_change_only_harmless_settings() -> None:
    saved = load_preset(DEFAULT_PRESET)
    harmless = resolve_config(overrides={"run.device": "cpu", "run.checkpoint_every": 7,
                                         "data.data_dir": "/d", "run.run_dir": "runs/x", "run.log_every": 3,
                                         "run.dist_timeout_s": 60})
    check_resume_compatible(saved, harmless)
    with pytest.raises(ConfigError,
                       match=r"cannot change meta.inner_lr when resuming \(the run used 0.4, got 0.1\)"):
        check_resume_compatible(saved, resolve_config(overrides={"meta.inner_lr": 0.1}))
    with pytest.raises(ConfigError, match="cannot change preset"):
        check_resume_compatible(saved, load_preset("omniglot-anil-5w1s"))


def test_config_to_dict_is_json_ready() -> None:
    assert json.loads(json.dumps(config_to_dict(Config())))["meta"]["inner_lr"] == 0.4


def test_norm_init_reaches_the_model_the_run_builds() -> None:
    from metagrad.models.layers import BatchNorm
    from metagrad.training.setup import make_model

    for name in ("omniglot-maml-20w1s", "mini-imagenet-maml-5w1s"):
        config = resolve_config(preset=name, overrides={"model.norm_init": "ones"})
        image_shape = (1, 28, 28) if "omniglot" in name else (3, 84, 84)
        model = make_model(config.model, config.data.ways, image_shape)
        norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
        assert norms and all(torch.all(m.weight == 1) for m in norms)
    assert load_preset("omniglot-maml-20w1s").model.norm_init == "learn2learn"


def test_absolute_folders_expands_home_and_the_current_folder(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = absolute_folders(resolve_config(overrides={"data.data_dir": "data", "data.cache_dir": "~/cache",
                                                        "run.run_dir": "~"}))
    assert config.data.data_dir == str(tmp_path / "data")
    assert config.data.cache_dir == str(tmp_path / "home" / "cache")
    assert config.run.run_dir == str(tmp_path / "home")
    unset = absolute_folders(resolve_config(overrides={"data.data_dir": ""}))
    assert (unset.data.data_dir, unset.data.cache_dir, unset.run.run_dir) == ("", None, None)  # the defaults
