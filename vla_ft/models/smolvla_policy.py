"""A LeRobot SmolVLA checkpoint as a vla-ft policy: our batches in, our loop, our evaluator.

``model.pretrained`` naming a LeRobot SmolVLA directory (``config.json`` with ``"type":
"smolvla"``) loads it whole through :mod:`vla_ft.models.smolvla_io`; :class:`SmolVLAPolicy` then
speaks the batch vocabulary of ``vla_ft.constants`` so that the trainer (full-parameter by
default, LLRD and discriminative LRs from :meth:`SmolVLAModel.depths`, bf16, FSDP2, exact resume)
and the simulation evaluator (``predict_action`` / ``select_action``, inherited) use it as any
other policy:

* images: the last frame of each camera, uint8 -> [0, 1], resized with padding by the model;
* state: our normalized state (last frame), zero-padded to ``max_state_dim``;
* instruction: the SmolVLM tokenizer with LeRobot's text rules (a trailing newline, right
  padding, truncation at ``tokenizer_max_length``), applied by the dataset;
* actions: our normalized chunk; ``data.chunk`` must equal the checkpoint's ``chunk_size``.

Normalization statistics are our dataset's (``mean_std``), installed like any policy's, and written
into LeRobot's processor files on save. A checkpoint saved here *is* a LeRobot SmolVLA directory
(config.json, model.safetensors with LeRobot's key names, processor files, ``vlm/``) plus our
``normalization.json``, ``vla_ft.json`` and ``manifest.json``: it loads back here and in LeRobot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_ft.config import ModelConfig, config_to_dict
from vla_ft.constants import (
    ACTION,
    ACTION_IS_PAD,
    IMAGES,
    INSTR_IDS,
    INSTR_MASK,
    OUT_ACTION,
    OUT_FLOW_ERR,
    STATE,
)
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.models.flow import sample_time
from vla_ft.models.policy import ModelDims, VLAPolicy
from vla_ft.models.smolvla import SmolVLAModel
from vla_ft.models.smolvla_io import SmolVLAProcessor, load_lerobot_smolvla, save_lerobot_smolvla

SIDE_FILE = "vla_ft.json"  # our model config and dims next to LeRobot's files
LEROBOT_IMAGE_PREFIX = "observation.images."


def is_smolvla_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a LeRobot SmolVLA ``config.json``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("type") == "smolvla"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


class SmolVLATokenizer:
    """The SmolVLM tokenizer seen through LeRobot's text rules (newline, right padding, max length).

    Called like a Hugging Face tokenizer by the dataset (``padding="max_length"``: the extra pad
    tokens are masked out of attention and positions, so the result equals LeRobot's
    ``padding="longest"``).
    """

    def __init__(self, processor: SmolVLAProcessor) -> None:
        self.processor = processor

    def __call__(self, texts: list[str], max_length: int | None = None, **kwargs: Any) -> Any:
        limit = (
            self.processor.max_length if max_length is None else min(max_length, self.processor.max_length)
        )
        kwargs.update(truncation=True, padding_side="right")
        return self.processor.tokenizer(self.processor.format_tasks(list(texts)), max_length=limit, **kwargs)

    def __len__(self) -> int:
        return len(self.processor.tokenizer)

    def save_pretrained(self, out_dir: str) -> None:  # the tokenizer lives in the saved vlm/ dir
        del out_dir


class SmolVLAPolicy(VLAPolicy):
    """SmolVLA behind the :class:`VLAPolicy` interface (training outputs and inference methods).

    Training forward (ACTION in the batch): ``OUT_FLOW_ERR`` (B, H, A) squared velocity errors at
    a random flow time and ``OUT_ACTION`` the one-step estimate ``x_t - t * v_t``. Without ACTION:
    ``OUT_ACTION`` sampled with ``num_steps`` Euler steps from noise.
    """

    heatmap_count = 0  # no keypoint layer
    task_outputs: frozenset[str] = frozenset()  # no task heads: loss.task_terms must be empty

    def __init__(self, cfg: ModelConfig, dims: ModelDims, model: SmolVLAModel, processor: SmolVLAProcessor):
        nn.Module.__init__(self)
        arch = model.arch
        problems = []
        if dims.action_dim > arch.max_action_dim:
            problems.append(
                f"the data's action has {dims.action_dim} dims, max_action_dim is {arch.max_action_dim}"
            )
        if dims.state_dim > arch.max_state_dim:
            problems.append(
                f"the data's state has {dims.state_dim} dims, max_state_dim is {arch.max_state_dim}"
            )
        if problems:
            raise ConfigError(
                f"model.pretrained={cfg.pretrained!r}: {'; '.join(problems)}; use a SmolVLA checkpoint "
                f"with larger max_state_dim/max_action_dim, or fewer data.state_keys"
            )
        if dims.chunk != arch.chunk_size:
            raise ConfigError(
                f"data.chunk={dims.chunk} but the SmolVLA checkpoint {cfg.pretrained} predicts chunks of "
                f"{arch.chunk_size}; set data.chunk={arch.chunk_size}"
            )
        if dims.history != 1:
            raise ConfigError(f"data.history={dims.history}: SmolVLA sees one frame; set data.history=1")
        if cfg.action_head != "flow":
            raise ConfigError(
                f"model.action_head={cfg.action_head!r} with a SmolVLA checkpoint: its head is a flow "
                f"matching action expert; set model.action_head=flow"
            )
        self.cfg, self.dims, self.arch = cfg, dims, {"kind": "smolvla", "path": str(cfg.pretrained)}
        self.backbone = model
        self.processor = processor
        self.tokenizer = SmolVLATokenizer(processor)
        self.normalizer: Any = None
        self.reset()

    # ------------------------------------------------------------------ VLAPolicy interface
    def lora_problem(self, r: int) -> str | None:
        return (
            f"model.lora.r={r} does not apply to a SmolVLA checkpoint (LoRA here adapts the backbone of "
            f"a vla-ft policy): set model.lora.r=0 (full fine-tuning; model.freeze can freeze modules)"
        )

    @property
    def action_bins(self) -> None:
        return None

    def set_gradient_checkpointing(self, enable: bool) -> None:
        self.backbone.gradient_checkpointing = bool(enable)

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        images = batch[IMAGES]  # uint8 (B, T, K, 3, H, W): the last frame of every camera
        frames = [images[:, -1, k].float() / 255.0 for k in range(images.shape[2])]
        pixels, masks = self.backbone.prepare_images(frames)
        state = (
            batch[STATE][:, -1] if batch[STATE].shape[-1] else images.new_zeros(images.shape[0], 1).float()
        )
        return {
            "images": pixels,
            "img_masks": masks,
            "tokens": batch[INSTR_IDS].long(),
            "token_mask": batch[INSTR_MASK].bool(),
            "state": state.float(),
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = self._model_inputs(batch)
        a = self.dims.action_dim
        if ACTION not in batch:
            actions = self.backbone.sample_actions(**inputs, num_steps=self.cfg.flow_steps)
            return {OUT_ACTION: actions[..., :a]}
        target = batch[ACTION].float()
        t = sample_time(target.shape[0], target.device)
        out = self.backbone.flow_loss(
            **inputs, actions=target, time=t, action_is_pad=batch.get(ACTION_IS_PAD), action_dim=a
        )
        estimate = out.x_t - t[:, None, None] * out.v_t.to(out.x_t.dtype)  # one step to t = 0
        return {OUT_FLOW_ERR: out.losses[..., :a], OUT_ACTION: estimate[..., :a]}

    def save_pretrained(
        self, out_dir: Any, manifest: bool = True, state: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write a LeRobot SmolVLA directory (our data's features and statistics) plus our side files.

        ``state``: the policy's full state dict when its parameters are sharded (FSDP2: gathered
        on rank 0 by ``vla_ft.train.checkpoint.save_full_model``)."""
        from vla_ft.integrity import write_manifest

        if state is not None:
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        out = save_lerobot_smolvla(self.backbone, _processor_for(self), out_dir, state=state)
        meta = {
            "format": "vla_ft.smolvla",
            "model": config_to_dict(self.cfg),
            "dims": dataclasses.asdict(self.dims),
        }
        (out / SIDE_FILE).write_text(json.dumps(meta, indent=1))
        if self.normalizer is not None:
            self.normalizer.save(out / "normalization.json")
        if manifest:
            write_manifest(out)
        return out


def _lerobot_image_key(key: str) -> str:
    return key if key.startswith(LEROBOT_IMAGE_PREFIX) else f"{LEROBOT_IMAGE_PREFIX}{key}"


def _processor_for(policy: SmolVLAPolicy) -> SmolVLAProcessor:
    """The processor LeRobot should load for this policy: our cameras, dims and statistics."""
    proc = dataclasses.replace(policy.processor)
    cfg = json.loads(json.dumps(proc.lerobot_config or {"type": "smolvla"}))
    d = policy.dims
    h, w = d.image_size
    visual = {_lerobot_image_key(k): {"type": "VISUAL", "shape": [3, h, w]} for k in d.image_keys}
    state = {proc.state_key: {"type": "STATE", "shape": [d.state_dim]}} if d.state_dim else {}
    cfg["input_features"] = {**visual, **state}
    cfg["output_features"] = {proc.action_key: {"type": "ACTION", "shape": [d.action_dim]}}
    cfg["chunk_size"] = policy.backbone.arch.chunk_size
    proc.lerobot_config = cfg
    norm = policy.normalizer
    if norm is not None:
        if norm.mode != "mean_std":
            raise ConfigError(
                f"data.normalization={norm.mode!r}: a SmolVLA checkpoint stores mean/std statistics; "
                f"set data.normalization=mean_std"
            )
        stats = dict(proc.norm_stats)
        for ours, theirs in (("action", proc.action_key), ("state", proc.state_key)):
            if ours in norm.stats:
                for stat in ("mean", "std", "min", "max"):
                    stats[f"{theirs}.{stat}"] = torch.as_tensor(norm.stats[ours][stat], dtype=torch.float32)
        proc.norm_stats = stats
        proc.unnorm_stats = {k: v for k, v in stats.items() if k.startswith(f"{proc.action_key}.")} | {
            k: v for k, v in proc.unnorm_stats.items() if not k.startswith(f"{proc.action_key}.")
        }
    return proc


def smolvla_tokenizer(path: str | Path, vlm_dir: str | None = None) -> SmolVLATokenizer:
    """The tokenizer of a SmolVLA directory (its VLM's, with the processor's text rules), without
    building the model: the dataset tokenizes instructions before the model loads."""
    from vla_ft.models.smolvla_io import _check_config, _load_processor, _read_json, resolve_vlm_dir

    path = Path(path)
    raw = _read_json(path / "config.json", "the SmolVLA config")
    cfg = _check_config(raw, path / "config.json")
    return SmolVLATokenizer(_load_processor(path, cfg, raw, resolve_vlm_dir(path, cfg, vlm_dir)))


def load_smolvla_policy(path: str | Path, cfg: ModelConfig | None = None, info: Any = None) -> SmolVLAPolicy:
    """A LeRobot SmolVLA directory (from LeRobot, or saved here) as a :class:`SmolVLAPolicy`.

    Args:
        path: the checkpoint directory.
        cfg: the run's model config (None: the one saved beside a checkpoint written here, else
            defaults with ``action_head=flow``).
        info: the dataset's dims and normalizer (None: the checkpoint's own features).
    """
    from vla_ft.data.normalize import Normalizer
    from vla_ft.integrity import model_files, verify
    from vla_ft.models.params import apply_freeze

    path = Path(path)
    verify(path, include=model_files)
    vlm_dir = cfg.vlm if cfg is not None and cfg.vlm else None
    model, processor = load_lerobot_smolvla(path, vlm_dir=vlm_dir)
    side = path / SIDE_FILE
    saved = json.loads(side.read_text()) if side.is_file() else None
    if cfg is None:
        cfg = ModelConfig(**saved["model"]) if saved else ModelConfig(action_head="flow")
    cfg = dataclasses.replace(cfg, pretrained=str(path))
    if info is not None:
        dims = ModelDims.from_info(info)
    elif saved:
        dims = ModelDims(**{**saved["dims"], "image_size": tuple(saved["dims"]["image_size"])})
    else:
        h, w = model.arch.resize_hw or (64, 64)
        dims = ModelDims(
            action_dim=processor.action_dim,
            state_dim=processor.state_dim,
            image_keys=list(processor.camera_keys),
            image_size=(h, w),
            chunk=model.arch.chunk_size,
        )
    policy = SmolVLAPolicy(cfg, dims, model, processor)
    apply_freeze(policy, cfg.freeze)  # full fine-tuning unless model.freeze names modules
    if (path / "normalization.json").is_file():
        policy.set_normalizer(Normalizer.load(path / "normalization.json"))
    else:
        policy.set_normalizer(_normalizer_from_processor(processor))
    if info is not None and getattr(info, "normalizer", None) is not None:
        policy.set_normalizer(info.normalizer)
    return policy


def _normalizer_from_processor(processor: SmolVLAProcessor) -> Any:
    """A mean_std Normalizer holding the checkpoint's own state/action statistics."""
    import numpy as np

    from vla_ft.data.normalize import STAT_NAMES, Normalizer

    stats = {}
    for ours, theirs, stat_dict in (
        ("action", processor.action_key, processor.unnorm_stats),
        ("state", processor.state_key, processor.norm_stats),
    ):
        if f"{theirs}.mean" not in stat_dict:
            continue
        mean = stat_dict[f"{theirs}.mean"].double().numpy().reshape(-1)
        std = stat_dict[f"{theirs}.std"].double().numpy().reshape(-1)
        entry = {s: np.zeros_like(mean) for s in STAT_NAMES}
        entry.update(mean=mean, std=std, min=mean - std, max=mean + std)
        for s in STAT_NAMES:
            key = f"{theirs}.{s}"
            if key in stat_dict and stat_dict[key].numel() == mean.size:
                entry[s] = stat_dict[key].double().numpy().reshape(-1)
        stats[ours] = entry
    if not stats:
        raise CheckpointError("the SmolVLA checkpoint has no state/action statistics in its processor files")
    return Normalizer("mean_std", stats)
