"""The comparison's rows: what each name stands for, and each row's config (the shared config plus
the row's changes). The names and what they run: the package docstring (vla_ft/compare/__init__.py)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla_ft.config import Config, config_from_dict, config_to_dict
from vla_ft.errors import ConfigError

# LoRA at 10x the config's (full fine-tuning) learning rate: at 1x LoRA r=16 scored 0/100 on
# pick_place, at 3x 83/100, at 10x 95/100 against full fine-tuning's 94/100 (docs/results/
# compare_pick_place/); a shared rate would compare LoRA at a rate it is not run at.
DEFAULT_ROWS = (
    "base",
    "lora_r8_lr10",
    "lora_r16_lr10",
    "full",
    "scratch",
    "bc_cnn",
    "full_w_task_0",
    "full_w_task_0.1",
    "full_w_task_0.5",
)
ROW_NAMES_HELP = (
    "base, full, scratch, bc_cnn (the plain CNN behaviour-cloning baseline), lora_r<R> (e.g. lora_r8), "
    "full_w_task_<W> (e.g. full_w_task_0.5), and any training row with _lr<M> for its learning rate "
    "times M (e.g. lora_r16_lr10)"
)
# The bc_cnn row: the plain CNN behaviour-cloning baseline with the recipe of the reference CNN that
# reached 91% on pick_place (where the tiny VLA from scratch reached 7%): every architecture field of
# the config reset (the preset is its own), lr 1e-3 without per-module multipliers or layer decay,
# batch 64, EMA 0.995, the L1 action loss without task terms. Steps, schedule, warmup, data and
# augmentation stay the config's.
BC_CNN_RECIPE: dict[str, Any] = {
    "model.pretrained": None,
    "model.preset": "bc-cnn",
    "model.lora.r": 0,
    "model.vision": None,
    "model.vision_pretrained": None,
    "model.language": None,
    "model.vlm": None,
    "model.hidden_size": None,
    "model.num_layers": None,
    "model.num_heads": None,
    "model.extra": {},
    "model.gradient_checkpointing": False,
    "model.freeze": [],
    "model.action_head": "continuous",
    "loss.action": "l1",
    "loss.task_terms": {},
    "train.lr": 1e-3,
    "train.pretrain_lr": None,
    "train.lr_scale": None,
    "train.module_lr": {},
    "train.layer_decay": 1.0,
    "train.unfreeze_steps": 0,
    "train.batch_size": 64,
    "train.grad_accum": 1,
    "train.ema": 0.995,
}
# model fields that define the base's architecture (vla_ft.models.loading.ARCH_FIELDS) + preset knobs
_ARCH_KEYS = ("preset", "vision", "language", "vlm", "hidden_size", "num_layers", "num_heads", "extra")


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a job (``train`` or ``eval``) with config changes."""

    name: str
    label: str
    kind: str  # "train": scripts/finetune.py, "eval": scripts/evaluate.py on the base
    changes: dict[str, Any]  # dotted config key -> value, applied over the shared config
    needs_base: bool
    lr_scale: float = 1.0  # train.lr of the shared config times this (the ``_lr<M>`` suffix)
    own_arch: bool = False  # builds its own architecture (``bc_cnn``), not the base's

    @property
    def from_scratch(self) -> bool:
        """``scratch`` and its ``_lr<M>`` variants: the base's architecture, no weights."""
        return self.kind == "train" and not self.needs_base and not self.own_arch


def parse_row(name: str) -> Row:
    """The row a name stands for.

    Raises:
        ConfigError: an unknown name (the message lists the valid forms).
    """
    if name == "base":
        return Row(name, "base, zero-shot (no training)", "eval", {}, True)
    m = re.fullmatch(r"(.+)_lr(\d+(?:\.\d+)?|\d*\.\d+)", name)
    if m:
        inner, scale = parse_row(m.group(1)), float(m.group(2))
        if inner.kind != "train" or inner.lr_scale != 1.0 or scale <= 0:
            why = (
                f"{inner.name!r} is not trained" if inner.kind != "train" else "give one positive multiplier"
            )
            raise ConfigError(f"--rows: row {name!r}: _lr{m.group(2)}: {why}; e.g. lora_r16_lr10")
        label = f"{inner.label}, learning rate x{scale:g}"
        return Row(name, label, inner.kind, inner.changes, inner.needs_base, scale, inner.own_arch)
    if name == "full":
        return Row(name, "full fine-tuning from the base", "train", {"model.lora.r": 0}, True)
    if name == "scratch":
        changes = {"model.lora.r": 0, "model.pretrained": None}
        return Row(name, "from scratch (same architecture, random init)", "train", changes, False)
    if name == "bc_cnn":
        label = "plain CNN behaviour cloning from scratch (bc-cnn: lr 1e-3, batch 64, EMA 0.995, L1 loss)"
        return Row(name, label, "train", dict(BC_CNN_RECIPE), False, own_arch=True)
    m = re.fullmatch(r"lora_r(\d+)", name)
    if m and int(m.group(1)) >= 1:
        r = int(m.group(1))
        return Row(name, f"LoRA r={r} on the base", "train", {"model.lora.r": r}, True)
    m = re.fullmatch(r"full_w_task_(\d+(?:\.\d+)?)", name)
    if m:
        w = float(m.group(1))
        changes = {"model.lora.r": 0, "loss.w_task": w}
        return Row(name, f"full fine-tuning, loss.w_task={w:g}", "train", changes, True)
    raise ConfigError(f"--rows: unknown row {name!r}; use names from: {ROW_NAMES_HELP}")


def parse_rows(names: list[str]) -> list[Row]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"--rows: name at least one row ({ROW_NAMES_HELP})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--rows: {', '.join(dup)} given more than once; name each row once")
    return [parse_row(n) for n in names]


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    node = values
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _base_arch(base: Path) -> dict[str, Any]:
    """The base's architecture fields from its config.json (so ``scratch`` builds the same model)."""
    try:
        model = json.loads((base / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.pretrained={str(base)!r}: cannot read its config.json ({exc})") from None
    return {f"model.{k}": model[k] for k in _ARCH_KEYS if k in model}


def shared_config(cfg: Config, out: Path, steps: int | None, episodes: int | None) -> dict[str, Any]:
    """The config every row starts from: the user's, with the budget and paths made explicit."""
    values = config_to_dict(cfg)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: use 1 or more optimizer steps")
        values["train"]["steps"] = steps
        if values["train"]["warmup_steps"] > steps:
            warm = steps // 10
            print(
                f"[compare] train.warmup_steps={values['train']['warmup_steps']} > --steps {steps}: using {warm}"
            )
            values["train"]["warmup_steps"] = warm
    if episodes is not None:
        if episodes < 1:
            raise ConfigError(f"--episodes {episodes}: use 1 or more evaluation episodes")
        values["eval"]["episodes"] = episodes
    data = [str(Path(p).resolve()) for p in values["data"]["paths"]]
    if Path(values["collect"]["output"]).resolve() == Path(data[0]):
        values["collect"]["output"] = data[0]
    values["data"]["paths"] = data
    values["train"].update(out_dir=str(out / "runs"), resume=None)
    values["log"]["progress"] = False  # child output goes to a log file
    return values


def row_config(shared: dict[str, Any], row: Row, out: Path, base: Path | None) -> dict[str, Any]:
    """A row's full config dict (validated): the shared config + the row's changes."""
    values = json.loads(json.dumps(shared))  # deep copy of plain data
    values["data"]["collect_if_missing"] = False  # collected once, up front
    values["train"]["run_name"] = row.name
    values["model"]["pretrained"] = str(base) if base is not None else None
    if row.from_scratch:
        for key, value in (_base_arch(base) if base is not None else {}).items():
            _set(values, key, value)
        values["model"]["vision_pretrained"] = None  # no component weights either
    if row.kind == "eval":
        values["eval"]["out_dir"] = str(out / "runs" / row.name / "eval")
    for key, value in row.changes.items():
        _set(values, key, value)
    if row.lr_scale != 1.0:  # the peak rate is pretrain_lr * lr_scale when those are set, else lr
        train = values["train"]
        if train.get("lr_scale") is not None:  # pretrain_lr scaled, lr computed from it again
            train["pretrain_lr"] = train["pretrain_lr"] * row.lr_scale
            train["lr"] = train["pretrain_lr"] * train["lr_scale"]
        else:
            train["lr"] = train["lr"] * row.lr_scale
    try:
        cfg = config_from_dict(values)
        if row.kind == "train":
            _check_bc_cnn(cfg)
    except ConfigError as exc:
        raise ConfigError(f"row {row.name}: {exc}") from None
    return values


def _check_bc_cnn(cfg: Config) -> None:
    """A row that builds or loads a bc-cnn policy (the ``bc_cnn`` row; any row on a bc-cnn base)
    uses no option it lacks: said before any row runs, not after the rows before it trained."""
    from vla_ft.models.bc_cnn import unsupported_options
    from vla_ft.models.loading import architecture_kind

    if architecture_kind(cfg.model) == "cnn":
        problems = unsupported_options(cfg, fresh=cfg.model.pretrained is None)
        if problems:
            raise ConfigError(problems[0])


def run_key(values: dict[str, Any], kind: str) -> str:
    """What makes two rows the same run: everything but the run name (and the eval output dir)."""
    v = json.loads(json.dumps(values))
    v["train"].pop("run_name")
    v["eval"].pop("out_dir")
    return kind + json.dumps(v, sort_keys=True)
