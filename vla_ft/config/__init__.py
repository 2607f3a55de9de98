"""The run configuration: a typed dataclass tree mirrored in YAML.

* :mod:`vla_ft.config.schema`: the sections (data, collect, env, model, loss, train, eval, log),
  each validating its own values, and :class:`Config`, which checks the rules across sections.
* :mod:`vla_ft.config.loader`: YAML files with ``base:`` inheritance, dotted overrides
  (``train.lr=3e-5``), ``load_config`` / ``save_config``.
* :mod:`vla_ft.config.convert`: strict conversion of plain values into the dataclasses (unknown
  keys and wrong types are one :class:`~vla_ft.errors.ConfigError` naming the key).
"""

from vla_ft.config.loader import (
    CONFIG_DIR,
    REPO_ROOT,
    apply_override,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
    resolve_config_path,
    save_config,
)
from vla_ft.config.schema import (
    FLOW_STEPS_KNOB,
    LORA_TARGETS,
    MODEL_EXTRA_KNOBS,
    AugmentConfig,
    CollectConfig,
    Config,
    DataConfig,
    EnvConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ModelExtra,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR",
    "FLOW_STEPS_KNOB",
    "LORA_TARGETS",
    "MODEL_EXTRA_KNOBS",
    "REPO_ROOT",
    "AugmentConfig",
    "CollectConfig",
    "Config",
    "DataConfig",
    "EnvConfig",
    "EvalConfig",
    "LogConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "ModelExtra",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_yaml",
    "resolve_config_path",
    "save_config",
]
