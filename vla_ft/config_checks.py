"""The rules of a run config that need more than the config, checked in the trainer's preflight
before anything loads (vla_ft/train/finetune.py). Each section validates its own values and
:class:`~vla_ft.config.schema.Config` the rules across sections when it is built; the ones here
are checked again with them, so a config changed after loading is still caught.

* The options the model's kind cannot honour (bc-cnn's ``unsupported_options``) need the model
  kind, which takes the preset registry and the checkpoint in ``vla_ft.models``; the config package
  sits below the models and cannot ask them.
* ``data.collect_if_missing`` with ``collect.output`` not ``data.paths[0]`` is a problem for
  training only: demo collection loads the same configs to write another file
  (``scripts/collect_demos.py --cfg pick_place.yaml collect.output=data/x.hdf5``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vla_ft.config import Config
from vla_ft.errors import ConfigError
from vla_ft.models.bc_cnn import unsupported_options
from vla_ft.models.loading import architecture_kind
from vla_ft.models.source import resolve_pretrained
from vla_ft.train.preflight import Problems


def config_problems(cfg: Config) -> list[ConfigError]:
    """Every check of the config that needs no data, done before anything loads (every one that
    fails): the cross-section rules, then :func:`model_kind_problems`."""
    return [*rule_problems(cfg), *model_kind_problems(cfg)]


def rule_problems(cfg: Config) -> list[ConfigError]:
    """The config's cross-section rules and the training-only ones (module docstring)."""
    found = cfg.cross_section_problems()
    if cfg.data.collect_if_missing and Path(cfg.collect.output) != Path(cfg.data.paths[0]):
        found.append(
            f"data.collect_if_missing collects into collect.output={cfg.collect.output!r}, which is not "
            f"data.paths[0]={cfg.data.paths[0]!r}: make them the same file"
        )
    return [ConfigError(msg) for msg in found]


def model_kind_problems(cfg: Config) -> list[ConfigError]:
    """The options the config's kind of model cannot honour (bc-cnn: the ones it has no use for;
    the model options among them would stop building the policy)."""
    if config_kind(cfg) != "cnn":
        return []
    return [ConfigError(msg) for msg in unsupported_options(cfg, fresh=cfg.model.pretrained is None)]


def config_kind(cfg: Config) -> str | None:
    """The kind of model the config builds or loads (``vla_ft.models.loading.architecture_kind``)."""
    return architecture_kind(
        dataclasses.replace(cfg.model, pretrained=resolve_pretrained(cfg.model.pretrained))
    )


def check_config(cfg: Config) -> None:
    """:func:`config_problems`, raised (one problem as it is, several together)."""
    problems = Problems()
    for error in config_problems(cfg):
        problems.add(error)
    problems.raise_if_any()
