"""LeRobot SmolVLA checkpoints in and out, and LeRobot's pre/post-processing for them.

A LeRobot (>= 0.4) SmolVLA ``pretrained_model/`` directory holds ``config.json`` (``"type":
"smolvla"``), ``model.safetensors`` (keys ``model.*``), ``policy_preprocessor.json`` /
``policy_postprocessor.json`` (processor pipelines) with one stats file each (flat
``"<feature>.<stat>"`` safetensors) and a reference to the SmolVLM directory (``vlm_model_name``:
its ``config.json`` fixes the architecture, its ``tokenizer.json`` the tokens).

* :func:`load_lerobot_smolvla` -> ``(SmolVLAModel, SmolVLAProcessor)``;
* :func:`save_lerobot_smolvla` writes the same layout back (LeRobot loads it unchanged);
* :class:`SmolVLAProcessor` turns raw observations into what LeRobot's preprocessor produces and
  un-normalizes actions like its postprocessor; :func:`model_inputs`, :func:`compute_loss` and
  :func:`predict_action_chunk` glue it to the model.

Every problem with the files raises :class:`vla_ft.errors.ConfigError` with one message naming the
file/key and the fix.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vla_ft.errors import ConfigError
from vla_ft.models.smolvla import (
    LEROBOT_UNUSED_KEYS,
    FlowLoss,
    SmolVLAArch,
    SmolVLAModel,
    from_lerobot_key,
    to_lerobot_key,
)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
VLM_SUBDIR = "vlm"

OBS_STATE = "observation.state"
ACTION = "action"
ACTION_IS_PAD = "action_is_pad"
TASK = "task"
LANG_TOKENS = "observation.language.tokens"
LANG_MASK = "observation.language.attention_mask"

# lerobot 0.6.1 SmolVLAConfig defaults (PreTrainedConfig's included), used for absent fields.
LEROBOT_DEFAULTS: dict[str, Any] = {
    "n_obs_steps": 1,
    "input_features": {},
    "output_features": {},
    "device": None,
    "use_amp": False,
    "use_peft": False,
    "push_to_hub": True,
    "repo_id": None,
    "private": None,
    "tags": None,
    "license": None,
    "pretrained_path": None,
    "pretrained_revision": None,
    "chunk_size": 50,
    "n_action_steps": 50,
    "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    "max_state_dim": 32,
    "max_action_dim": 32,
    "resize_imgs_with_padding": [512, 512],
    "empty_cameras": 0,
    "adapt_to_pi_aloha": False,
    "use_delta_joint_actions_aloha": False,
    "tokenizer_max_length": 48,
    "num_steps": 10,
    "use_cache": True,
    "freeze_vision_encoder": True,
    "train_expert_only": True,
    "train_state_proj": True,
    "optimizer_lr": 1e-4,
    "optimizer_betas": [0.9, 0.95],
    "optimizer_eps": 1e-8,
    "optimizer_weight_decay": 1e-10,
    "optimizer_grad_clip_norm": 10,
    "scheduler_warmup_steps": 1000,
    "scheduler_decay_steps": 30000,
    "scheduler_decay_lr": 2.5e-6,
    "vlm_model_name": "HuggingFaceTB/SmolVLM2-500M-Video-Instruct",
    "load_vlm_weights": False,
    "add_image_special_tokens": False,
    "attention_mode": "cross_attn",
    "prefix_length": -1,
    "pad_language_to": "longest",
    "num_expert_layers": -1,
    "num_vlm_layers": 16,
    "self_attn_every_n_layers": 2,
    "expert_width_multiplier": 0.75,
    "min_period": 4e-3,
    "max_period": 4.0,
    "rtc_config": None,
    "compile_model": False,
    "compile_mode": "max-autotune",
}
# config.json value -> arch field (the rest of the config only matters to LeRobot's trainer/runtime)
_ARCH_FIELDS = (
    "chunk_size",
    "max_state_dim",
    "max_action_dim",
    "num_vlm_layers",
    "num_expert_layers",
    "self_attn_every_n_layers",
    "expert_width_multiplier",
    "num_steps",
    "min_period",
    "max_period",
    "tokenizer_max_length",
    "empty_cameras",
    "prefix_length",
)
_SUPPORTED_NORM = {
    "VISUAL": ("IDENTITY",),
    "STATE": ("MEAN_STD", "IDENTITY"),
    "ACTION": ("MEAN_STD", "IDENTITY"),
}


# ---------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: missing ({what}); a LeRobot SmolVLA checkpoint directory needs it")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path}: not valid JSON ({e}); restore the file from the original checkpoint"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"{path}: missing ({what}); copy it from the original checkpoint")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ConfigError(
            f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is truncated or "
            "corrupt, copy it again from the original checkpoint"
        ) from None


# fields later LeRobot versions added that steer training or compilation, not the network: accepted
# and kept (written back on save), never read
LATER_TRAINING_FIELDS = {
    "fine_tune_vision_encoder",
    "vision_encoder_lr_multiplier",
    "compile_model",
    "compile_mode",
}


def _check_config(cfg: dict, path: Path) -> dict:
    """Validate a LeRobot config.json dict; returns it with defaults filled in."""
    kind = cfg.get("type")
    if kind != "smolvla":
        raise ConfigError(
            f'{path}: "type" is {kind!r}, expected "smolvla"; '
            "this reader loads LeRobot SmolVLA checkpoints only"
        )
    unknown = sorted(set(cfg) - set(LEROBOT_DEFAULTS) - LATER_TRAINING_FIELDS - {"type"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {unknown} (not in lerobot 0.6.1's SmolVLAConfig); they may change the "
            "network, so the checkpoint is not loaded. Remove them if they do not, or extend vla_ft's "
            "SmolVLA reader"
        )
    full = {**copy.deepcopy(LEROBOT_DEFAULTS), **cfg}
    unsupported = {
        "attention_mode": ("cross_attn",),
        "add_image_special_tokens": (False,),
        "adapt_to_pi_aloha": (False,),
        "use_delta_joint_actions_aloha": (False,),
    }
    for key, ok in unsupported.items():
        if full[key] not in ok:
            raise ConfigError(
                f"{path}: {key}={full[key]!r} is not supported by vla_ft's SmolVLA (supported: "
                f"{', '.join(repr(v) for v in ok)}); set {key} to {ok[0]!r} or use LeRobot itself"
            )
    rtc = full["rtc_config"]
    if isinstance(rtc, dict) and rtc.get("enabled", False):
        raise ConfigError(
            f"{path}: rtc_config.enabled=true (real-time chunking) is not supported; set it to false"
        )
    n_vlm, n_exp = full["num_vlm_layers"], full["num_expert_layers"]
    if n_exp > 0 and n_exp != n_vlm:
        raise ConfigError(
            f"{path}: num_expert_layers={n_exp} differs from num_vlm_layers={n_vlm}; "
            "only an expert as deep as the VLM is supported (set num_expert_layers to -1)"
        )
    for kind_key, mode in full["normalization_mapping"].items():
        if mode not in _SUPPORTED_NORM.get(kind_key, (mode,)):
            raise ConfigError(
                f"{path}: normalization_mapping.{kind_key}={mode!r} is not supported (supported: "
                f"{', '.join(_SUPPORTED_NORM[kind_key])})"
            )
    size = full["resize_imgs_with_padding"]
    if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 2):
        raise ConfigError(f"{path}: resize_imgs_with_padding={size!r} must be [width, height] or null")
    return full


def _features(cfg: dict, path: Path) -> tuple[list[str], str, int, str, int]:
    """(camera keys in input_features order, state key, state dim, action key, action dim)."""
    inputs, outputs = cfg.get("input_features") or {}, cfg.get("output_features") or {}
    for key, feat in {**inputs, **outputs}.items():
        if not isinstance(feat, dict) or not isinstance(feat.get("shape"), list) or not feat["shape"]:
            raise ConfigError(
                f'{path}: feature {key!r} must be {{"type": ..., "shape": [...]}}, got {feat!r}'
            )
    cams = [k for k, f in inputs.items() if f.get("type") == "VISUAL"]
    states = [k for k, f in inputs.items() if f.get("type") == "STATE"]
    actions = [k for k, f in outputs.items() if f.get("type") == "ACTION"]
    if not cams:
        raise ConfigError(f"{path}: input_features has no VISUAL feature; SmolVLA needs at least one camera")
    if len(states) != 1:
        raise ConfigError(f"{path}: input_features needs exactly one STATE feature, found {states}")
    if len(actions) != 1:
        raise ConfigError(f"{path}: output_features needs exactly one ACTION feature, found {actions}")
    return (
        cams,
        states[0],
        int(inputs[states[0]]["shape"][0]),
        actions[0],
        int(outputs[actions[0]]["shape"][0]),
    )


def resolve_vlm_dir(ckpt: Path, cfg: dict, vlm_dir: str | Path | None = None) -> Path:
    """The SmolVLM directory: ``vlm_dir`` if given, else config ``vlm_model_name`` when it is an
    existing absolute directory, else ``<ckpt>/vlm``."""
    if vlm_dir is not None:
        p = Path(vlm_dir)
        if not p.is_dir():
            raise ConfigError(
                f"model.vlm={str(vlm_dir)!r} is not a directory; "
                "give the SmolVLM directory (config.json + tokenizer)"
            )
        return p
    name = cfg.get("vlm_model_name")
    if isinstance(name, str) and Path(name).is_absolute() and Path(name).is_dir():
        return Path(name)
    if (ckpt / VLM_SUBDIR).is_dir():
        return ckpt / VLM_SUBDIR
    raise ConfigError(
        f"{ckpt / CONFIG_FILE}: vlm_model_name={name!r} is not an existing absolute directory and "
        f"there is no {VLM_SUBDIR}/ directory beside the checkpoint; copy the SmolVLM directory "
        f"(config.json + tokenizer files) to {ckpt / VLM_SUBDIR}, or set model.vlm to it"
    )


def _load_vlm_config(vlm_dir: Path):
    from transformers import AutoConfig
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMConfig

    if not (vlm_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{vlm_dir / CONFIG_FILE}: missing; the SmolVLM directory must hold the VLM's config.json"
        )
    try:
        cfg = AutoConfig.from_pretrained(str(vlm_dir))
    except Exception as e:
        raise ConfigError(
            f"{vlm_dir / CONFIG_FILE}: not a readable transformers config ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(cfg, SmolVLMConfig):
        raise ConfigError(
            f'{vlm_dir / CONFIG_FILE}: model_type={getattr(cfg, "model_type", None)!r}, expected "smolvlm" '
            "(SmolVLA's VLM is a SmolVLM)"
        )
    if getattr(cfg.text_config, "model_type", None) != "llama":
        raise ConfigError(
            f"{vlm_dir / CONFIG_FILE}: text_config.model_type="
            f'{cfg.text_config.model_type!r}, expected "llama"'
        )
    return cfg


def _load_tokenizer(vlm_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(vlm_dir))
    except Exception as e:
        raise ConfigError(
            f"{vlm_dir}: cannot load the tokenizer ({type(e).__name__}: {e}); the SmolVLM directory needs "
            "tokenizer.json + tokenizer_config.json"
        ) from None


def arch_from_lerobot_config(cfg: dict, vlm_config) -> SmolVLAArch:
    """SmolVLAArch from a (validated) LeRobot config dict and the SmolVLM config."""
    size = cfg["resize_imgs_with_padding"]
    return SmolVLAArch(
        vlm_config=vlm_config,
        resize_hw=None if size is None else (int(size[1]), int(size[0])),
        **{k: cfg[k] for k in _ARCH_FIELDS},
    )


def _find_step(pipeline: dict, registry_name: str, path: Path) -> dict:
    for step in pipeline.get("steps", []):
        if step.get("registry_name") == registry_name:
            return step
    raise ConfigError(f"{path}: no {registry_name!r} step; restore the file from the original checkpoint")


# ---------------------------------------------------------------------------------------------- processor
def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def image_to_float_chw(img) -> Tensor:
    """A camera frame as LeRobot feeds it to the policy: float32 (B, 3, H, W) in [0, 1].

    uint8 input is channels-last ((H, W, 3) or (B, H, W, 3)) and is divided by 255; float input is
    channels-first ((3, H, W) or (B, 3, H, W)) already in [0, 1].
    """
    t = _as_tensor(img)
    if t.dtype == torch.uint8:
        if t.shape[-1] != 3 or t.dim() not in (3, 4):
            raise ValueError(f"uint8 images must be (H, W, 3) or (B, H, W, 3), got {tuple(t.shape)}")
        t = (t.to(torch.float32) / 255).movedim(-1, -3).contiguous()
    elif t.is_floating_point():
        if t.dim() not in (3, 4) or t.shape[-3] != 3:
            raise ValueError(
                f"float images must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(t.shape)}"
            )
        t = t.to(torch.float32)
    else:
        raise ValueError(f"images must be uint8 HWC or float CHW, got dtype {t.dtype}")
    return t if t.dim() == 4 else t[None]


@dataclass
class SmolVLAProcessor:
    """What LeRobot's SmolVLA pre/post-processor pipelines do, plus the checkpoint's side files.

    Attributes:
        tokenizer: the SmolVLM tokenizer.
        camera_keys: camera features in ``input_features`` order (the prefix order).
        state_key / state_dim, action_key / action_dim: the real (unpadded) feature widths.
        norm_modes: ``{"VISUAL"|"STATE"|"ACTION": "IDENTITY"|"MEAN_STD"}``.
        norm_stats / unnorm_stats: the flat ``"<feature>.<stat>"`` dicts of the preprocessor's
            normalizer and the postprocessor's unnormalizer (kept whole, written back on save).
        eps: added to std when normalizing (not when un-normalizing).
        append_newline: add ``"\\n"`` to each task that lacks one (SmolVLA's newline step).
        max_length / padding / padding_side / truncation: tokenizer call settings.
        rename_map: observation key renames applied first (LeRobot's rename step).
        resize_hw: (height, width) images are resized to (informational; the model does it).
        n_action_steps: actions executed per chunk by LeRobot's ``select_action``.
        vlm_dir: the SmolVLM directory read (copied beside the checkpoint on save).
        lerobot_config / preprocessor_config / postprocessor_config: the raw JSON files read.
        extra_tensors: LeRobot weights the model does not hold (the VLM ``lm_head``), by LeRobot key.
    """

    tokenizer: Any
    camera_keys: list[str]
    state_key: str = OBS_STATE
    state_dim: int = 0
    action_key: str = ACTION
    action_dim: int = 0
    norm_modes: dict[str, str] = field(
        default_factory=lambda: dict(LEROBOT_DEFAULTS["normalization_mapping"])
    )
    norm_stats: dict[str, Tensor] = field(default_factory=dict)
    unnorm_stats: dict[str, Tensor] = field(default_factory=dict)
    eps: float = 1e-8
    append_newline: bool = True
    max_length: int = 48
    padding: str = "longest"
    padding_side: str = "right"
    truncation: bool = True
    rename_map: dict[str, str] = field(default_factory=dict)
    resize_hw: tuple[int, int] | None = None
    n_action_steps: int = 50
    vlm_dir: Path | None = None
    lerobot_config: dict = field(default_factory=dict)
    preprocessor_config: dict = field(default_factory=dict)
    postprocessor_config: dict = field(default_factory=dict)
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)

    # -------------------------------------------------------------- language
    def format_tasks(self, tasks: str | Sequence[str], batch_size: int | None = None) -> list[str]:
        """Task strings after the newline rule; a single string is repeated ``batch_size`` times."""
        if isinstance(tasks, str):
            tasks = [tasks] * (batch_size or 1)
        tasks = list(tasks)
        if batch_size is not None and len(tasks) != batch_size:
            raise ValueError(f"got {len(tasks)} task strings for a batch of {batch_size}")
        if self.append_newline:
            tasks = [t if t.endswith("\n") else f"{t}\n" for t in tasks]
        return tasks

    def tokenize(self, tasks: str | Sequence[str], batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) int64 token ids and (B, T) bool mask (True = real token), as LeRobot's tokenizer step."""
        out = self.tokenizer(
            self.format_tasks(tasks, batch_size),
            max_length=self.max_length,
            truncation=self.truncation,
            padding=self.padding,
            padding_side=self.padding_side,
            return_tensors="pt",
        )
        return out["input_ids"].to(torch.int64), out["attention_mask"].to(torch.bool)

    # -------------------------------------------------------------- normalization
    def _mean_std(self, stats: dict[str, Tensor], key: str, device, file_what: str) -> tuple[Tensor, Tensor]:
        try:
            mean, std = stats[f"{key}.mean"], stats[f"{key}.std"]
        except KeyError as e:
            raise ConfigError(
                f"{file_what}: no {e.args[0]!r} statistic; the checkpoint's stats file is incomplete"
            ) from None
        return mean.to(device=device, dtype=torch.float32), std.to(device=device, dtype=torch.float32)

    def normalize(self, x: Tensor, key: str, kind: str) -> Tensor:
        """``(x - mean) / (std + eps)`` with the preprocessor's stats (identity for IDENTITY)."""
        x = _as_tensor(x).to(torch.float32)
        if self.norm_modes.get(kind, "IDENTITY") == "IDENTITY":
            return x
        mean, std = self._mean_std(self.norm_stats, key, x.device, "normalizer stats")
        return (x - mean) / (std + self.eps)

    def normalize_state(self, state) -> Tensor:
        return self.normalize(state, self.state_key, "STATE")

    def normalize_action(self, action) -> Tensor:
        return self.normalize(action, self.action_key, "ACTION")

    def unnormalize_action(self, action: Tensor) -> Tensor:
        """``x * std + mean`` with the postprocessor's stats (no eps), as LeRobot's unnormalizer."""
        action = _as_tensor(action)
        if self.norm_modes.get("ACTION", "IDENTITY") == "IDENTITY":
            return action
        mean, std = self._mean_std(self.unnorm_stats, self.action_key, action.device, "unnormalizer stats")
        return action * std.to(action.dtype) + mean.to(action.dtype)

    # -------------------------------------------------------------- whole batch
    def __call__(
        self,
        observation: Mapping[str, Any],
        task: str | Sequence[str],
        action=None,
        action_is_pad=None,
    ) -> dict[str, Any]:
        """Raw inputs -> the batch LeRobot's preprocessor produces (LeRobot key names).

        Args:
            observation: camera keys -> uint8 HWC or float CHW [0, 1] images (batched or not), and
                the state key -> (S,) or (B, S) raw state. Keys are renamed by ``rename_map`` first.
            task: one instruction per sample (or one string for the whole batch).
            action: optional (B, chunk, A) or (chunk, A) raw action chunk (training).
            action_is_pad: optional (B, chunk) bool, passed through.

        Returns:
            dict with the camera keys (float32 (B, 3, H, W) in [0, 1]), the normalized state,
            ``observation.language.tokens`` / ``.attention_mask``, ``task`` (after the newline
            rule) and, when given, the normalized ``action`` and ``action_is_pad``.
        """
        obs = {self.rename_map.get(k, k): v for k, v in observation.items()}
        if self.state_key not in obs:
            raise ValueError(f"observation has no {self.state_key!r}")
        state = _as_tensor(obs[self.state_key]).to(torch.float32)
        state = state[None] if state.dim() == 1 else state
        batch: dict[str, Any] = {}
        for key in self.camera_keys:
            if key in obs:
                batch[key] = image_to_float_chw(obs[key])
            if f"{key}_padding_mask" in obs:
                batch[f"{key}_padding_mask"] = _as_tensor(obs[f"{key}_padding_mask"]).bool()
        batch[self.state_key] = self.normalize_state(state)
        b = state.shape[0]
        tasks = self.format_tasks(task, b)
        batch[TASK] = tasks
        batch[LANG_TOKENS], batch[LANG_MASK] = self.tokenize(tasks)
        if action is not None:
            act = _as_tensor(action).to(torch.float32)
            batch[self.action_key] = self.normalize_action(act[None] if act.dim() == 2 else act)
        if action_is_pad is not None:
            pad = _as_tensor(action_is_pad).bool()
            batch[ACTION_IS_PAD] = pad[None] if pad.dim() == 1 else pad
        return batch


# ---------------------------------------------------------------------------------------------- model glue
def model_inputs(
    model: SmolVLAModel, processor: SmolVLAProcessor, batch: Mapping[str, Any]
) -> dict[str, Any]:
    """Preprocessed batch -> keyword arguments of ``SmolVLAModel.flow_loss`` / ``sample_actions``.

    Cameras present in ``batch`` come first in ``camera_keys`` order; missing ones (at most
    ``arch.empty_cameras``) become all -1 images with False masks, as in LeRobot.
    """
    present = [k for k in processor.camera_keys if k in batch]
    missing = [k for k in processor.camera_keys if k not in batch]
    if not present:
        raise ValueError(f"the batch holds none of the cameras {processor.camera_keys}")
    if len(missing) > model.arch.empty_cameras:
        raise ValueError(
            f"cameras {missing} missing from the batch (empty_cameras={model.arch.empty_cameras})"
        )
    images, masks = model.prepare_images(
        [batch[k] for k in present], [batch.get(f"{k}_padding_mask") for k in present], n_empty=len(missing)
    )
    return {
        "images": images,
        "img_masks": masks,
        "tokens": batch[LANG_TOKENS],
        "token_mask": batch[LANG_MASK],
        "state": batch[processor.state_key],
    }


def compute_loss(
    model: SmolVLAModel,
    processor: SmolVLAProcessor,
    batch: Mapping[str, Any],
    noise: Tensor | None = None,
    time: Tensor | None = None,
) -> FlowLoss:
    """LeRobot's ``SmolVLAPolicy.forward`` on a preprocessed batch (needs ``action``)."""
    return model.flow_loss(
        **model_inputs(model, processor, batch),
        actions=batch[processor.action_key],
        noise=noise,
        time=time,
        action_is_pad=batch.get(ACTION_IS_PAD),
        action_dim=processor.action_dim,
    )


@torch.no_grad()
def predict_action_chunk(
    model: SmolVLAModel,
    processor: SmolVLAProcessor,
    batch: Mapping[str, Any],
    noise: Tensor | None = None,
    num_steps: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample one chunk: ``(normalized, unnormalized)`` actions, both (B, chunk, action_dim)."""
    actions = model.sample_actions(**model_inputs(model, processor, batch), noise=noise, num_steps=num_steps)
    normalized = actions[..., : processor.action_dim]
    return normalized, processor.unnormalize_action(normalized)


# ---------------------------------------------------------------------------------------------- load
def load_lerobot_smolvla(
    path: str | Path, vlm_dir: str | Path | None = None
) -> tuple[SmolVLAModel, SmolVLAProcessor]:
    """Load a LeRobot SmolVLA ``pretrained_model`` directory (float32, CPU, eval mode).

    Args:
        path: directory with config.json, model.safetensors and the processor files.
        vlm_dir: SmolVLM directory (config.json + tokenizer); default: config ``vlm_model_name``
            if it is an existing absolute directory, else ``<path>/vlm``.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise ConfigError(f"{ckpt}: not a directory; pass a LeRobot SmolVLA pretrained_model directory")
    cfg_path = ckpt / CONFIG_FILE
    raw_cfg = _read_json(cfg_path, "the SmolVLA config")
    cfg = _check_config(raw_cfg, cfg_path)
    cams, state_key, state_dim, action_key, action_dim = _features(cfg, cfg_path)
    if state_dim > cfg["max_state_dim"] or action_dim > cfg["max_action_dim"]:
        raise ConfigError(
            f"{cfg_path}: state/action widths {state_dim}/{action_dim} exceed max_state_dim/max_action_dim "
            f"{cfg['max_state_dim']}/{cfg['max_action_dim']}"
        )
    vdir = resolve_vlm_dir(ckpt, cfg, vlm_dir)
    vlm_config = _load_vlm_config(vdir)
    try:
        arch = arch_from_lerobot_config(cfg, vlm_config)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{cfg_path} with {vdir / CONFIG_FILE}: not a valid SmolVLA architecture ({e})"
        ) from None

    model = SmolVLAModel(arch)
    extras = _load_weights(model, ckpt / WEIGHTS_FILE)
    model.eval()

    processor = _load_processor(ckpt, cfg, raw_cfg, vdir)
    processor.camera_keys, processor.state_key, processor.state_dim = cams, state_key, state_dim
    processor.action_key, processor.action_dim = action_key, action_dim
    processor.extra_tensors = extras
    return model, processor


def _load_weights(model: SmolVLAModel, path: Path) -> dict[str, Tensor]:
    """Copy LeRobot tensors into ``model``; returns the LeRobot tensors it does not hold."""
    tensors = _read_safetensors(path, "the SmolVLA weights")
    expected = model.state_dict()
    ours: dict[str, Tensor] = {}
    extras: dict[str, Tensor] = {}
    unexpected = []
    for key, t in tensors.items():
        key_n = key.replace("model._orig_mod.", "model.", 1)  # torch.compile'd checkpoints
        if key_n in LEROBOT_UNUSED_KEYS:
            extras[key_n] = t
            continue
        try:
            name = from_lerobot_key(key_n)
        except KeyError:
            unexpected.append(key)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"{path}: tensor {key} has shape {list(t.shape)}, the architecture from config.json and the "
                f"VLM config expects {list(expected[name].shape)}; the weights do not belong to this config"
            )
        ours[name] = t
    missing = sorted(to_lerobot_key(n) for n in expected if n not in ours)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {sorted(unexpected)[:3]})")
        raise ConfigError(
            f"{path}: {' and '.join(parts)} for the architecture in config.json (num_vlm_layers, "
            "self_attn_every_n_layers, ...) and the VLM config; the weights and the config do not match"
        )
    model.load_state_dict(ours, strict=True)
    return extras


def _load_processor(ckpt: Path, cfg: dict, raw_cfg: dict, vlm_dir: Path) -> SmolVLAProcessor:
    pre_path, post_path = ckpt / PREPROCESSOR_FILE, ckpt / POSTPROCESSOR_FILE
    pre = _read_json(pre_path, "LeRobot's preprocessor pipeline")
    post = _read_json(post_path, "LeRobot's postprocessor pipeline")
    norm_step = _find_step(pre, "normalizer_processor", pre_path)
    unnorm_step = _find_step(post, "unnormalizer_processor", post_path)
    norm_cfg = norm_step.get("config", {})
    modes = dict(cfg["normalization_mapping"])
    modes.update(norm_cfg.get("norm_map") or {})
    for kind, mode in modes.items():
        if mode not in _SUPPORTED_NORM.get(kind, (mode,)):
            raise ConfigError(f"{pre_path}: norm_map.{kind}={mode!r} is not supported")
    _, state_key, _, action_key, _ = _features(cfg, ckpt / CONFIG_FILE)
    needs = {
        "normalizer": [
            k for k, kind in ((state_key, "STATE"), (action_key, "ACTION")) if modes.get(kind) == "MEAN_STD"
        ],
        "unnormalizer": [action_key] if modes.get("ACTION") == "MEAN_STD" else [],
    }
    stats = {}
    for step, base, what in ((norm_step, pre_path, "normalizer"), (unnorm_step, post_path, "unnormalizer")):
        name = step.get("state_file")
        if not name:
            raise ConfigError(
                f"{base}: the {what} step has no state_file; restore the file from the checkpoint"
            )
        stats[what] = _read_safetensors(ckpt / name, f"the {what} statistics named in {base.name}")
        for key in (f"{k}.{stat}" for k in needs[what] for stat in ("mean", "std")):
            if key not in stats[what]:
                raise ConfigError(f"{ckpt / name}: no {key!r} statistic, which MEAN_STD normalization needs")
    tok_cfg = next(
        (
            s.get("config", {})
            for s in pre.get("steps", [])
            if s.get("registry_name") == "tokenizer_processor"
        ),
        None,
    )
    if tok_cfg is None:
        raise ConfigError(
            f"{pre_path}: no 'tokenizer_processor' step; restore the file from the original checkpoint"
        )
    rename = next(
        (
            s.get("config", {}).get("rename_map") or {}
            for s in pre.get("steps", [])
            if s.get("registry_name") == "rename_observations_processor"
        ),
        {},
    )
    size = cfg["resize_imgs_with_padding"]
    proc = SmolVLAProcessor(
        tokenizer=_load_tokenizer(vlm_dir),
        camera_keys=[],
        norm_modes=modes,
        norm_stats=stats["normalizer"],
        unnorm_stats=stats["unnormalizer"],
        eps=float(norm_cfg.get("eps", 1e-8)),
        append_newline=any(
            s.get("registry_name") == "smolvla_new_line_processor" for s in pre.get("steps", [])
        ),
        max_length=int(tok_cfg.get("max_length", cfg["tokenizer_max_length"])),
        padding=tok_cfg.get("padding", cfg["pad_language_to"]),
        padding_side=tok_cfg.get("padding_side", "right"),
        truncation=bool(tok_cfg.get("truncation", True)),
        rename_map=dict(rename),
        resize_hw=None if size is None else (int(size[1]), int(size[0])),
        n_action_steps=int(cfg["n_action_steps"]),
        vlm_dir=vlm_dir,
        lerobot_config=copy.deepcopy(raw_cfg),
        preprocessor_config=pre,
        postprocessor_config=post,
    )
    return proc


# ---------------------------------------------------------------------------------------------- save
def save_lerobot_smolvla(
    model: SmolVLAModel,
    processor: SmolVLAProcessor,
    out_dir: str | Path,
    vlm_model_name: str | None = None,
    state: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` + ``processor`` as a LeRobot SmolVLA ``pretrained_model`` directory.

    ``state`` replaces ``model.state_dict()`` (the gathered full weights of an FSDP-sharded model).

    The SmolVLM directory is copied to ``<out_dir>/vlm``; ``config.json``'s ``vlm_model_name`` and
    the tokenizer step's ``tokenizer_name`` point at its absolute path (or at ``vlm_model_name`` if
    given, e.g. a hub id). ``model.safetensors`` uses LeRobot's key names and includes the
    VLM ``lm_head`` LeRobot expects (zeros if the processor carries none). The directory is built
    next to ``out_dir`` and renamed into place; an existing ``out_dir`` is replaced.
    """
    from safetensors.torch import save_file

    if not processor.preprocessor_config or not processor.postprocessor_config:
        raise ConfigError(
            "processor has no LeRobot pipeline configs to write; "
            "use the processor returned by load_lerobot_smolvla"
        )
    if processor.vlm_dir is None or not Path(processor.vlm_dir).is_dir():
        raise ConfigError(
            f"processor.vlm_dir={processor.vlm_dir!r} is not a directory; set it to the SmolVLM directory"
        )
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    vlm_name = vlm_model_name or str(out / VLM_SUBDIR)
    try:
        tmp.mkdir()
        shutil.copytree(processor.vlm_dir, tmp / VLM_SUBDIR)

        cfg = copy.deepcopy(processor.lerobot_config) or {"type": "smolvla"}
        arch = model.arch
        for key in _ARCH_FIELDS:
            cfg[key] = getattr(arch, key)
        if arch.resize_hw is not None:
            cfg["resize_imgs_with_padding"] = [arch.resize_hw[1], arch.resize_hw[0]]
        cfg["vlm_model_name"] = vlm_name
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=4))

        state = model.state_dict() if state is None else state
        tensors = {to_lerobot_key(k): v.detach().cpu().contiguous() for k, v in state.items()}
        for key in LEROBOT_UNUSED_KEYS:
            extra = processor.extra_tensors.get(key)
            if extra is None:  # LeRobot's strict load wants the lm_head; it never reads it
                extra = torch.zeros(arch.text_config.vocab_size, arch.hidden, dtype=torch.float32)
            tensors[key] = extra.detach().cpu().contiguous()
        save_file(tensors, str(tmp / WEIGHTS_FILE))

        pre = copy.deepcopy(processor.preprocessor_config)
        post = copy.deepcopy(processor.postprocessor_config)
        for step in pre.get("steps", []):
            if step.get("registry_name") == "tokenizer_processor":
                step.setdefault("config", {})["tokenizer_name"] = vlm_name
        for pipeline, name, stats, fname in (
            (pre, "normalizer_processor", processor.norm_stats, PREPROCESSOR_FILE),
            (post, "unnormalizer_processor", processor.unnorm_stats, POSTPROCESSOR_FILE),
        ):
            step = _find_step(pipeline, name, Path(fname))
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in stats.items()}, str(tmp / step["state_file"])
            )
            (tmp / fname).write_text(json.dumps(pipeline, indent=2))

        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
