"""Build, save and load VLA policies.

``load_vla(model_cfg, info)`` accepts ``model_cfg.pretrained`` = a directory in our format, a hub id
(only online; offline fails fast) or null (build ``model_cfg.preset`` with random weights).

Checkpoint dir: ``config.json`` (format, model config, dims, resolved architecture with full
transformers config dicts so no source model is needed to rebuild), ``model.safetensors``,
``normalization.json`` (when a normalizer is installed) and the tokenizer files. No pickle.

When a checkpoint is loaded with a ``model_cfg``, backbone fields (``ARCH_FIELDS``) come from the
checkpoint, ``model.extra``'s readout knobs (``READOUT_KNOBS``) from ``model_cfg`` (its other knobs
must match the checkpoint's), and everything else (head type and bins, dropout, inference options,
freeze, bounds) from ``model_cfg``. With ``info`` given, a different action dimension (another
robot), task count, chunk length, camera/history count, state size or action-head shape
re-initializes the affected tensors with a logged warning (the head adapts to the new task).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from vla_ft.config import FLOW_STEPS_KNOB, MODEL_EXTRA_KNOBS, ModelConfig, config_to_dict
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.integrity import model_files, verify, write_manifest
from vla_ft.models.backbone import NativeBackbone
from vla_ft.models.bc_cnn import build_bc_cnn, resolve_cnn_arch
from vla_ft.models.language import hub_or_dir
from vla_ft.models.params import apply_freeze, count_parameters
from vla_ft.models.policy import ModelDims, VLAPolicy, register_checkpoint_io
from vla_ft.models.presets import PRESETS, get_preset
from vla_ft.models.tokenizer import byte_tokenizer, check_vocab, has_tokenizer, read_tokenizer
from vla_ft.models.vlm import VLMBackbone

log = logging.getLogger(__name__)

FORMAT = "vla_ft.policy"
CONFIG_FILE, WEIGHTS_FILE, NORM_FILE = "config.json", "model.safetensors", "normalization.json"
# fields that define tensors: taken from the checkpoint when one is loaded
ARCH_FIELDS = ("preset", "vision", "language", "vlm", "hidden_size", "num_layers", "num_heads")
# tensors rebuilt (not loaded) when the data's dims differ from the checkpoint's
ADAPTABLE = ("task_head.", "action_queries", "view_embed", "state_proj.", "state_film.", "action_head.")
# tensors added after checkpoints of this format existed (zero-init or auxiliary): absent from an
# older file, they keep their init
LATER_TENSORS = ("task_head.waypoint.", "state_film.")
# native knobs added after checkpoints of this format existed -> the value an older checkpoint,
# whose arch lacks the key, was built with (each is a NativeBackbone argument of the same name)
ABSENT_KNOBS = {
    "keypoints": 0,
    "film": False,
    "keypoint_tokens": False,
    "keypoint_window": 0,
    "film_window": 0,
    "trunk_window": 0,
}
# native knobs that change how tensors are used, not which tensors exist: a config may set them
# on a checkpoint (e.g. fine-tune the shipped base with a FiLM window); the rest come from it
READOUT_KNOBS = ("keypoint_window", "film_window", "trunk_window")


def _size_overrides(text: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    text = dict(text)
    if cfg.hidden_size is not None:
        text["hidden_size"], text["intermediate_size"] = cfg.hidden_size, 2 * cfg.hidden_size
    if cfg.num_layers is not None:
        text["num_hidden_layers"] = cfg.num_layers
    if cfg.num_heads is not None:
        text["num_attention_heads"] = text["num_key_value_heads"] = cfg.num_heads
    return text


def _check_knobs(cfg: ModelConfig, kind: str) -> None:
    """Every ``model.extra`` key is a knob this kind of model reads (bc-cnn checks its own)."""
    own = (*MODEL_EXTRA_KNOBS[kind], FLOW_STEPS_KNOB)
    other = [key for key in cfg.extra.to_dict() if key not in own]
    if other:
        raise ConfigError(
            f"model.extra has {', '.join(other)}, which a {kind} model (model.preset={cfg.preset!r}"
            f"{', model.vlm' if cfg.vlm is not None else ''}) does not read; its knobs are "
            f"{', '.join(own)}: remove them"
        )


def resolve_arch(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture to build: preset values with the config's overrides applied.

    Raises:
        ConfigError: a ``model.extra`` knob of another kind of model, or an invalid bc-cnn value.
    """
    preset = get_preset(cfg.preset)
    if preset.kind == "cnn":
        return resolve_cnn_arch(preset.cnn, cfg)
    if cfg.vlm is not None or preset.kind == "vlm":
        _check_knobs(cfg, "vlm")
        vlm: Any = cfg.vlm if cfg.vlm is not None else copy.deepcopy(preset.vlm)
        if isinstance(vlm, dict):
            vlm["text_config"] = _size_overrides(vlm["text_config"], cfg)
        return {"kind": "vlm", "vlm": vlm}
    _check_knobs(cfg, "native")
    custom_vision = cfg.vision is not None and cfg.vision != preset.vision
    language: Any = cfg.language if cfg.language is not None else _size_overrides(preset.language, cfg)
    knobs = cfg.extra

    def knob(value: Any, default: Any) -> Any:  # a set knob, else the preset's value
        return default if value is None else value

    return {
        "kind": "native",
        "vision": cfg.vision or preset.vision,
        "vision_kwargs": dict(knob(knobs.vision_kwargs, {} if custom_vision else preset.vision_kwargs)),
        "pool_grid": knob(knobs.pool_grid, preset.pool_grid),
        "channels_last": knob(knobs.channels_last, preset.channels_last),
        "keypoints": knob(knobs.keypoints, preset.keypoints),
        "film": knob(knobs.film, preset.film),
        "keypoint_tokens": knob(knobs.keypoint_tokens, preset.keypoint_tokens),
        "keypoint_window": knob(knobs.keypoint_window, preset.keypoint_window),
        "film_window": knob(knobs.film_window, preset.film_window),
        "trunk_window": knob(knobs.trunk_window, preset.trunk_window),
        "language": language,
    }


def _build_backbone(arch: dict[str, Any], cfg: ModelConfig, vision_pretrained: str | None) -> torch.nn.Module:
    if arch["kind"] == "vlm":
        stats = arch.get("image_stats")
        return VLMBackbone(arch["vlm"], cfg.trust_remote_code, tuple(stats) if stats else None)
    return NativeBackbone(
        arch["vision"],
        arch["vision_kwargs"],
        arch["pool_grid"],
        arch["language"],
        vision_pretrained,
        arch["channels_last"],
        cfg.trust_remote_code,
        # absent in checkpoints written before these options: ABSENT_KNOBS holds what they mean
        **{key: type(old)(arch.get(key, old)) for key, old in ABSENT_KNOBS.items()},
    )


def _config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as plain JSON values (HF's own serializer handles dtypes etc.)."""
    return json.loads(config.to_json_string(use_diff=False))


def _saved_arch(arch: dict[str, Any], backbone: torch.nn.Module) -> dict[str, Any]:
    """Replace model dirs / hub ids by the full config dicts so a checkpoint rebuilds on its own."""
    out = dict(arch)
    if arch["kind"] == "vlm":
        out["vlm"] = _config_dict(backbone.model.config)
        out["image_stats"] = list(backbone.image_stats)
    else:
        out["language"] = _config_dict(backbone.language.model.config)
    return out


def build_policy(cfg: ModelConfig, dims: ModelDims, arch: dict[str, Any] | None = None) -> VLAPolicy:
    """A policy with random (or component-pretrained) weights; all parameters trainable."""
    fresh = arch is None
    arch = resolve_arch(cfg) if fresh else arch
    if arch["kind"] == "cnn":  # no backbone of ours: its own policy class (vla_ft/models/bc_cnn.py)
        policy = build_bc_cnn(cfg, dims, arch)
        apply_freeze(policy, cfg.freeze)
        return policy
    backbone = _build_backbone(arch, cfg, cfg.vision_pretrained if fresh else None)
    source = arch.get("vlm") if arch["kind"] == "vlm" else arch.get("language")
    if isinstance(source, str) and has_tokenizer(source):
        tokenizer = read_tokenizer(source, cfg.trust_remote_code)
    else:
        tokenizer = byte_tokenizer()
    check_vocab(tokenizer, backbone.vocab_size, "model")
    policy = VLAPolicy(cfg, dims, backbone, tokenizer, _saved_arch(arch, backbone))
    if cfg.gradient_checkpointing:
        policy.set_gradient_checkpointing(True)
    apply_freeze(policy, cfg.freeze)
    return policy


def save_pretrained(policy: VLAPolicy, out_dir: str | Path, manifest: bool = True) -> Path:
    """Write config.json, model.safetensors, normalization.json and the tokenizer into ``out_dir``,
    then (``manifest``) ``manifest.json`` with every file's sha256 (the trainer writes one manifest
    for the whole checkpoint instead)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": 1,
        "model": config_to_dict(policy.cfg),
        "dims": dataclasses.asdict(policy.dims),
        "arch": policy.arch,
    }
    save_model(policy, str(out / WEIGHTS_FILE))  # drops duplicate names of shared (tied) tensors
    if policy.normalizer is not None:
        policy.normalizer.save(out / NORM_FILE)
    policy.tokenizer.save_pretrained(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    if manifest:
        write_manifest(out)
    return out


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE}; not a vla-ft checkpoint (save with save_pretrained)"
        )
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE}; the checkpoint is incomplete, re-save it")
    verify(path, include=model_files)  # sizes + sha256 against manifest.json, when it has one
    return read_format_json(cfg_file, FORMAT)


def architecture_kind(cfg: ModelConfig) -> str | None:
    """The kind of model ``cfg`` builds or loads, read without building it: the preset's kind
    (``native``, ``vlm``, ``cnn``) or a local checkpoint's (its ``config.json``; ``smolvla`` for a
    LeRobot SmolVLA directory). None when only loading can tell (a hub id) or the source is unreadable
    (the checks that load it report why)."""
    if cfg.pretrained is None:
        preset = PRESETS.get(cfg.preset)
        if preset is None:
            return None
        return "vlm" if cfg.vlm is not None and preset.kind == "native" else preset.kind
    file = Path(cfg.pretrained) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("type") == "smolvla":
        return "smolvla"
    arch = meta.get("arch") if meta.get("format") == FORMAT else None
    return arch.get("kind") if isinstance(arch, dict) else None


def check_checkpoint(path: Path) -> None:
    """A checkpoint directory that :func:`from_pretrained` can read: its files present, verified
    against the manifest, and its config in our format or LeRobot's SmolVLA (nothing is built)."""
    from vla_ft.models.smolvla_policy import is_smolvla_dir

    if is_smolvla_dir(path):
        if not (Path(path) / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{path}: no {WEIGHTS_FILE}; the SmolVLA checkpoint is incomplete")
        verify(Path(path), include=model_files)
        return
    _read_meta(Path(path))


def read_format_json(file: Path, fmt: str) -> dict[str, Any]:
    """A JSON metadata file whose ``format`` field must be ``fmt`` (one CheckpointError otherwise)."""
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{file}: format={meta.get('format')!r}, expected {fmt!r}")
    return meta


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is one CheckpointError."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{file}: cannot read the weights ({str(exc).splitlines()[0][:120]}): the file is truncated "
            f"or corrupt; re-copy the checkpoint directory, or choose another checkpoint"
        ) from None


def _shared_groups(policy: VLAPolicy) -> dict[str, set[str]]:
    """Name -> names of all tensors sharing its storage (tied weights)."""
    by_ptr: dict[tuple, set[str]] = {}
    state = policy.state_dict(keep_vars=True)
    for name, t in state.items():
        by_ptr.setdefault((t.device, t.untyped_storage().data_ptr()), set()).add(name)
    return {name: group for group in by_ptr.values() for name in group}


def load_weights(
    policy: VLAPolicy, file: Path, skip: tuple[str, ...] = (), fresh: tuple[str, ...] = ()
) -> list[str]:
    """Load ``file`` into ``policy``; names starting with a prefix in ``skip`` keep their init when
    their shape differs, and those starting with a prefix in ``fresh`` when the file lacks them
    (another head type: the tensors it shares with the checkpoint's head are loaded).

    Returns:
        names of tensors skipped because their shape differs and they are in ``skip``, and of
        tensors of ``LATER_TENSORS`` the file does not have (an older checkpoint).

    Raises:
        CheckpointError: missing, unexpected or mismatched tensors (the first few are named).
    """
    loaded = read_safetensors(file)
    own = policy.state_dict()
    groups = _shared_groups(policy)
    missing = [n for n in own if n not in loaded and not (groups[n] & loaded.keys())]
    later = [n for n in missing if n.startswith(LATER_TENSORS + fresh)]
    missing = [n for n in missing if n not in later]
    unexpected = [n for n in loaded if n not in own]
    mismatched = [n for n in loaded if n in own and loaded[n].shape != own[n].shape]
    adapted = [n for n in mismatched if n.startswith(skip)] + later
    bad = [n for n in mismatched if n not in adapted]

    def few(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    if missing or unexpected or bad:
        parts = [f"missing: {few(missing)}"] * bool(missing) + [f"unexpected: {few(unexpected)}"] * bool(
            unexpected
        )
        parts += [
            f"shape mismatch: {few([f'{n} {tuple(loaded[n].shape)} vs {tuple(own[n].shape)}' for n in bad])}"
        ] * bool(bad)
        raise CheckpointError(f"{file}: tensors do not match the model ({'; '.join(parts)})")
    state = {n: t for n, t in loaded.items() if n not in adapted}
    for name in list(state):  # fill tied duplicates dropped at save time
        for other in groups[name]:
            state.setdefault(other, state[name])
    policy.load_state_dict(state, strict=False)
    return adapted


def from_pretrained(path: str | Path, cfg: ModelConfig | None = None, info: Any = None) -> VLAPolicy:
    """Load a checkpoint directory (see module docstring for how ``cfg`` and ``info`` apply).

    Raises:
        CheckpointError: missing files, or tensors that do not match.
    """
    from vla_ft.models.smolvla_policy import is_smolvla_dir, load_smolvla_policy

    path = Path(path)
    if is_smolvla_dir(path):  # a LeRobot SmolVLA directory (from LeRobot, or saved here)
        return load_smolvla_policy(path, cfg, info)
    meta = _read_meta(path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved_cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    arch = meta["arch"]  # as saved: what the checkpoint was trained with
    if cfg is None:
        cfg = saved_cfg
    else:
        arch = _with_readout_knobs(arch, cfg, path)
        cfg = dataclasses.replace(
            cfg, **{k: getattr(saved_cfg, k) for k in ARCH_FIELDS}, pretrained=str(path)
        )
    saved_dims = ModelDims(**{**meta["dims"], "image_size": tuple(meta["dims"]["image_size"])})
    dims = saved_dims if info is None else ModelDims.from_info(info)
    if dims.action_dim != saved_dims.action_dim:
        # another robot's action space: the action head's output layer is new (re-initialized below,
        # with the warning), everything that reads images, state and language is kept
        log.warning(
            "%s: the checkpoint predicts %d-D actions, the data has %d-D: the action head starts fresh",
            path,
            saved_dims.action_dim,
            dims.action_dim,
        )
    policy = build_policy(cfg, dims, arch=arch)
    # another action head type than the checkpoint's (e.g. flow on a continuous base): the head's
    # new tensors keep their init, the ones it shares with the saved head (its MLP trunk) load
    fresh = ("action_head.",) if cfg.action_head != saved_cfg.action_head else ()
    adapted = load_weights(policy, path / WEIGHTS_FILE, skip=ADAPTABLE, fresh=fresh)
    if adapted:
        log.warning(
            "%s: re-initialized %s (data dims differ from the checkpoint's, or the checkpoint predates "
            "the head)",
            path,
            ", ".join(adapted),
        )
    policy.tokenizer = read_tokenizer(path, cfg.trust_remote_code)
    if (path / NORM_FILE).is_file():
        from vla_ft.data.normalize import Normalizer

        policy.set_normalizer(Normalizer.load(path / NORM_FILE))
    if info is not None and getattr(info, "normalizer", None) is not None:
        policy.set_normalizer(info.normalizer)
    return policy


def _with_readout_knobs(arch: dict[str, Any], cfg: ModelConfig, path: Path) -> dict[str, Any]:
    """The checkpoint's architecture with the config's readout knobs (``READOUT_KNOBS``, native
    checkpoints) applied.

    Raises:
        ConfigError: the config sets another knob of the checkpoint's kind (native, cnn) to a value
            other than the checkpoint's (it would be silently ignored otherwise).
    """
    kind = arch.get("kind")
    readout = READOUT_KNOBS if kind == "native" else ()
    arch = dict(arch)
    absent = ABSENT_KNOBS if kind == "native" else {}
    for key, value in cfg.extra.to_dict().items():
        if key in readout:
            arch[key] = value
            continue
        if key not in MODEL_EXTRA_KNOBS.get(kind, ()) or (key not in arch and key not in absent):
            continue
        saved = arch.get(key, absent.get(key))
        if saved != value:
            changeable = ", ".join(readout) or "none"
            built = f"{key}={saved!r}" + ("" if key in arch else " (written before the knob existed)")
            raise ConfigError(
                f"model.extra.{key}={value!r}: the checkpoint {path} was built with {built}, "
                f"and this knob shapes its tensors, so it comes from the checkpoint; remove it from "
                f"model.extra (knobs that can change on a {kind} checkpoint: {changeable}), or set "
                f"model.pretrained=null to build model.preset from scratch"
            )
    return arch


def _hub_snapshot(repo_id: str) -> Path:
    hub_or_dir(repo_id, "model.pretrained")  # offline: fails fast
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id))


def load_vla(model_cfg: ModelConfig, info: Any = None) -> VLAPolicy:
    """Build or load a policy and log its trainable parameter count.

    Args:
        model_cfg: the ``model`` config section.
        info: a DatasetInfo-like object (dims, task names, normalizer); required for presets.
    """
    if model_cfg.pretrained is not None:
        path = Path(model_cfg.pretrained)
        if (
            not path.exists()
            and "/" in model_cfg.pretrained
            and not model_cfg.pretrained.startswith((".", "/"))
        ):
            path = _hub_snapshot(model_cfg.pretrained)
        policy = from_pretrained(path, model_cfg, info)
    else:
        if info is None:
            raise CheckpointError(
                "load_vla: building a preset needs the dataset's dims (pass info=DatasetInfo)"
            )
        policy = build_policy(model_cfg, ModelDims.from_info(info))
        if getattr(info, "normalizer", None) is not None:
            policy.set_normalizer(info.normalizer)
    trainable, total = count_parameters(policy)
    log.info("VLA policy: %s trainable / %s parameters", f"{trainable:,}", f"{total:,}")
    print(f"[vla_ft.models] {trainable:,} trainable / {total:,} parameters")
    return policy


register_checkpoint_io(save_pretrained, from_pretrained)
