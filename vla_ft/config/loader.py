"""Reading and writing run configs: YAML files with ``base:`` inheritance and dotted overrides.

* ``load_config(path, overrides)`` reads a YAML file (``base: other.yaml`` inherits: sections merge
  key by key, a field's value, a mapping too, replaces the inherited one),
  applies dotted overrides (``train.lr=3e-5``) and builds a :class:`~vla_ft.config.schema.Config`.
* Keys are strict: an unknown key is a :class:`ConfigError` naming it and the closest valid key.
* Values are type-checked against the dataclass annotations (``int`` widens to ``float``, nothing
  else is coerced; :mod:`vla_ft.config.convert`) and each section validates itself.
* ``save_config(cfg, run_dir)`` writes the resolved config into a run directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from vla_ft.config.convert import _build, _suggest
from vla_ft.config.schema import Config, ModelExtra
from vla_ft.errors import ConfigError
from vla_ft.io import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a plain (already merged) dict, strictly."""
    values = dict(values)
    values.pop("base", None)
    return _build(Config, values, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config or one of its sections as plain values (what ``config.yaml`` and checkpoints hold):
    ``dataclasses.asdict``, except that ``model.extra`` holds only the knobs that are set."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if isinstance(value, ModelExtra):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


# --------------------------------------------------------------------------------------------
# YAML files, inheritance, overrides
# --------------------------------------------------------------------------------------------


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else ``configs/<name>`` (``.yaml`` added when missing)."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [CONFIG_DIR / path.name]
    if path.suffix not in (".yaml", ".yml"):
        candidates.append(CONFIG_DIR / f"{path.name}.yaml")
    for cand in candidates:
        if cand.is_file():
            return cand
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(
        f"config file '{name}' not found (looked in . and {CONFIG_DIR}); known configs: {known}"
    )


def _deep_merge(base: dict, over: dict, cls: type | None = Config) -> dict:
    """``over`` on top of ``base``: sections (dataclass fields of ``cls``: ``train``, ``data.augment``,
    ``model.lora``, ...) merge key by key; every other value, a mapping too (``loss.task_terms``,
    ``train.module_lr``, ``env.gym_kwargs``), is replaced whole, so ``task_terms: {}`` clears the
    inherited terms instead of keeping them."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = dict(base)
    for key, value in over.items():
        section = hints.get(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dataclasses.is_dataclass(section):
            out[key] = _deep_merge(out[key], value, section)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML with ``base:`` inheritance resolved (paths relative to the file)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
        base_path = (path.parent / base) if (path.parent / base).is_file() else resolve_config_path(base)
        values = _deep_merge(read_yaml(base_path, (*_seen, path)), values)
    return values


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], full + "."))
    return keys


def apply_override(values: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.lr=3e-5)")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-5" as a string; accept plain float spellings for numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    parts = dotted.split(".")
    # Check the path against the schema so a typo gets a suggestion across sections.
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            if dataclasses.is_dataclass(cls):
                prefix = ".".join(parts[:i])
                valid = [k for k in _all_keys(Config) if k.count(".") == i and k.startswith(prefix)]
                close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else _suggest(part, list(hints))
                raise ConfigError(f"unknown config key {dotted!r}: {hint}")
            break  # inside a free-form mapping (e.g. env.gym_kwargs.foo)
        cls = hints[part]
        if cls is ModelExtra:  # its keys are checked when it is built, as in a YAML file
            break
        origin = typing.get_origin(cls)
        if origin in (typing.Union, types.UnionType):
            dcs = [a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)]
            cls = dcs[0] if dcs else cls
    out = dict(values)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file (bare names resolve into ``configs/``), apply overrides, validate."""
    values = read_yaml(resolve_config_path(path))
    for override in overrides:
        values = apply_override(values, override)
    return config_from_dict(values)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
