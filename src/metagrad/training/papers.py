"""The published accuracy each packaged preset reproduces, and whether a run still is that preset.

``metagrad results`` shows the number beside a run's own when the run trained its preset as packaged
(``tools/publish_result.py`` writes it into the published ``results.json`` too). A run whose data, model
or algorithm settings differ from its preset's is another experiment: the paper's number does not
apply to it, and the table says which setting differs instead.

Example:
    >>> from metagrad.training.config import load_preset
    >>> published_for(load_preset("omniglot-maml-5w1s"))
    '98.7 +/- 0.4 (Finn et al. 2017, Table 1)'
"""

from __future__ import annotations

from metagrad.errors import ConfigError
from metagrad.training.config import Config, _flatten, config_to_dict, load_preset

__all__ = ["PUBLISHED", "preset_differences", "published_for"]

_FINN = "Finn et al. 2017, Table 1"
_FINN_FO = 'Finn et al. 2017, Table 1, "MAML, first order approx."'
_ANIL = "Raghu et al. 2020, Table 2, mean +/- std over 3 seeds"
_ANIL_5WAY = "none published (ANIL reports 20-way Omniglot only)"
_META_SGD = ("Li et al. 2017, Table 2 (Omniglot), as Lian et al. 2020 (T-NAS, ICLR), Table 2 quotes it; not "
             "read in the paper itself")
_META_SGD_20W = ("Li et al. 2017, Table 2 (Omniglot); the mean as re-implementations round it (95.9), the "
                 "spread from unattributed summaries: not verified")
_META_SGD_MINI = ("Li et al. 2017, Table 3 (Mini-ImageNet), as Deleu et al. 2022 (COMLN, ICLR), Table 2 "
                  "quotes it; not read in the paper itself")
_MAMLPP_OMNIGLOT = ("Antoniou et al. 2019, Table 1, as paperswithcode.com lists it; spread and table not "
                    "verified; an ensemble of the 5 best checkpoints")
_MAMLPP_MINI = ("Antoniou et al. 2019, Table 2, as a third-party table quotes it; not verified against the "
                "paper, nor whether the spread is a CI or a std; an ensemble of the 5 best checkpoints")

_REPTILE = "Nichol et al. 2018, Table {}, with transduction (as metagrad's batch-statistics BatchNorm)"
_BOIL = "Oh et al. 2021, Table 1, 4conv"
_BERTINETTO = ("Bertinetto et al. 2019, Table 1, as third-party tables quote it; not read in the paper "
               "itself")
_L2L_README = "learn2learn's examples/vision/README.md, their own run, no spread"
_TPN = ("Liu et al. 2019 (TPN), their run of MAML, as later papers' tables quote it; not read in the paper "
        "itself")
_CHEN = ("Chen et al. 2019, Conv-4, trained with data augmentation, as third-party tables quote it; not "
         "read in the paper itself")
_ANIL_ONLY = "ANIL's paper reports Omniglot and Mini-ImageNet only"

PUBLISHED: dict[str, str] = {
    "omniglot-maml-5w1s": f"98.7 +/- 0.4 ({_FINN})",
    "omniglot-maml-5w5s": f"99.9 +/- 0.1 ({_FINN})",
    "omniglot-maml-5w1s-fast": "none published (metagrad's own recipe)",
    "omniglot-maml-20w1s": f"95.8 +/- 0.3 ({_FINN})",
    "omniglot-maml-20w5s": f"98.9 +/- 0.2 ({_FINN})",
    "omniglot-fomaml-5w1s": "98.3 +/- 0.5 (Nichol et al. 2018, Table 1)",
    "omniglot-fomaml-5w5s": f"99.2 +/- 0.2 ({_FINN_FO})",
    "omniglot-fomaml-20w1s": f"89.4 +/- 0.5 ({_FINN_FO})",
    "omniglot-fomaml-20w5s": f"97.9 +/- 0.1 ({_FINN_FO})",
    "omniglot-anil-5w1s": _ANIL_5WAY,
    "omniglot-anil-5w5s": _ANIL_5WAY,
    "omniglot-anil-20w1s": f"96.2 +/- 0.5 ({_ANIL})",
    "omniglot-anil-20w5s": f"98.0 +/- 0.3 ({_ANIL})",
    "mini-imagenet-maml-5w1s": f"48.70 +/- 1.84 ({_FINN})",
    "mini-imagenet-maml-5w5s": f"63.11 +/- 0.92 ({_FINN})",
    "mini-imagenet-anil-5w1s": f"46.7 +/- 0.4 ({_ANIL})",
    "mini-imagenet-anil-5w5s": f"61.5 +/- 0.5 ({_ANIL})",
    "omniglot-metasgd-5w1s": f"99.53 +/- 0.26 ({_META_SGD})",
    "omniglot-metasgd-20w1s": f"95.93 +/- 0.38 ({_META_SGD_20W})",
    "mini-imagenet-metasgd-5w1s": f"50.47 +/- 1.87 ({_META_SGD_MINI})",
    "mini-imagenet-metasgd-5w5s": f"64.03 +/- 0.94 ({_META_SGD_MINI})",
    "omniglot-mamlpp-5w1s": f"99.47 ({_MAMLPP_OMNIGLOT})",
    "omniglot-mamlpp-5w5s": f"99.85 ({_MAMLPP_OMNIGLOT})",
    "omniglot-mamlpp-20w1s": f"97.65 ({_MAMLPP_OMNIGLOT})",
    "omniglot-mamlpp-20w5s": f"99.33 ({_MAMLPP_OMNIGLOT})",
    "mini-imagenet-mamlpp-5w1s": f"52.15 +/- 0.26 ({_MAMLPP_MINI})",
    "mini-imagenet-mamlpp-5w5s": f"68.32 +/- 0.44 ({_MAMLPP_MINI})",
    "omniglot-boil-5w1s": "none published (BOIL's paper has no Omniglot table)",
    "mini-imagenet-boil-5w1s": f"49.61 +/- 0.16 ({_BOIL})",
    "mini-imagenet-boil-5w5s": f"66.45 +/- 0.37 ({_BOIL})",
    "omniglot-reptile-5w1s": f"97.68 +/- 0.04 ({_REPTILE.format(2)})",
    "omniglot-reptile-5w5s": f"99.48 +/- 0.06 ({_REPTILE.format(2)})",
    "omniglot-reptile-20w1s": f"89.43 +/- 0.14 ({_REPTILE.format(2)})",
    "mini-imagenet-reptile-5w1s": f"49.97 +/- 0.32 ({_REPTILE.format(1)})",
    "mini-imagenet-reptile-5w5s": f"65.99 +/- 0.58 ({_REPTILE.format(1)})",
    "cifar-fs-maml-5w1s": f"58.9 +/- 1.9 ({_BERTINETTO})",
    "cifar-fs-maml-5w5s": f"71.5 +/- 1.0 ({_BERTINETTO})",
    "cifar-fs-anil-5w1s": f"none published ({_ANIL_ONLY}, and learn2learn's table has CIFAR-FS at 5 shots "
                          "only)",
    "cifar-fs-anil-5w5s": f"68.3 ({_L2L_README})",
    "fc100-maml-5w1s": "none published (MAML and learn2learn's tables have no FC100 1-shot MAML with this "
                       "network)",
    "fc100-maml-5w5s": f"49.0 ({_L2L_README})",
    "fc100-anil-5w1s": f"none published ({_ANIL_ONLY}, and learn2learn's table has FC100 at 5 shots only)",
    "fc100-anil-5w5s": f"47.6 ({_L2L_README})",
    "tiered-imagenet-maml-5w1s": f"51.67 +/- 1.81 ({_TPN})",
    "tiered-imagenet-maml-5w5s": f"70.30 +/- 1.75 ({_TPN})",
    "tiered-imagenet-anil-5w1s": f"none published ({_ANIL_ONLY}; the tiered-ImageNet numbers seen in later "
                                 "tables could not be traced to their source)",
    "tiered-imagenet-anil-5w5s": f"none published ({_ANIL_ONLY}; the tiered-ImageNet numbers seen in later "
                                 "tables could not be traced to their source)",
    "cub-maml-5w1s": f"54.73 +/- 0.97 ({_CHEN})",
    "cub-maml-5w5s": f"75.75 +/- 0.76 ({_CHEN})",
    "cub-anil-5w1s": f"none published ({_ANIL_ONLY})",
    "cub-anil-5w5s": f"none published ({_ANIL_ONLY})",
}
"""Packaged preset -> the published test accuracy (%) it is set up to reproduce, with its source. The
spreads are 95% confidence intervals except where the source says otherwise; a number without one is a
mean whose spread could not be verified. Each preset's TOML quotes
the same number in its header (a test keeps the two in step)."""

_IRRELEVANT = frozenset({"data.data_dir", "data.cache_dir", "meta.iterations", "meta.vectorize",
                         "meta.tasks_per_chunk"})
"""Settings that do not make a run another experiment: where the data is, how far it trained (the table
shows the iterations done), and how the same gradients are computed."""


def preset_differences(config: Config) -> list[str]:
    """The data, model and meta settings (``"meta.inner_lr"``, ...) in which ``config`` is not its preset.

    Settings in ``_IRRELEVANT`` are not compared. Empty when ``config.preset`` is not a packaged preset.
    """
    try:
        preset = load_preset(config.preset)
    except ConfigError:
        return []
    ours, theirs = _flatten(config_to_dict(config)), _flatten(config_to_dict(preset))
    return [key for key in theirs if key.split(".")[0] in ("data", "model", "meta")
            and key not in _IRRELEVANT and ours[key] != theirs[key]]


def published_for(config: Config) -> str:
    """The paper's number for a run of ``config``: ``PUBLISHED[preset]`` when the run's data, model and
    meta settings are its preset's (apart from ``_IRRELEVANT``), else ``""`` (no packaged preset, no
    number known, or another experiment: see :func:`preset_differences`)."""
    number = PUBLISHED.get(config.preset, "")
    return number if number and not preset_differences(config) else ""
