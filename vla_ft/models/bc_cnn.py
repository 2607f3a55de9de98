"""``bc-cnn``: a plain CNN behaviour-cloning policy, the baseline a VLA is judged against.

A small CNN of this kind, trained from scratch with an L1 action loss, is a strong behaviour-cloning
baseline (docs/models.md has the reference numbers); users should see that reference point on their
own data, trained and scored by the same loop, checkpoint format and evaluator
(``scripts/compare.py`` row ``bc_cnn``; docs/models.md).

Architecture (``Preset.kind == "cnn"``; the numbers are the preset's, ``model.extra`` overrides them):

* per camera a conv-ReLU stack (3x3 convs, channels 32-32-64-64, strides 2-1-2-1: a 20x20 map at
  80 px), read out as spatial-softmax keypoints (32 expected (x, y), linearly mapped to 64 values)
  next to the map's global average (64): where things are and what is there. One encoder per
  camera, shared by the history frames;
* the proprio state (all history frames) through one linear layer (64);
* the instruction: a learned embedding of each token plus its position, a per-token ReLU layer,
  mean-pooled over the real tokens (64). No transformer. Positions and the per-token nonlinearity
  matter with byte tokens: a plain mean of byte embeddings is a bag of characters, identical for
  "put the red cube in the blue bowl" and "put the blue cube in the red bowl";
* all of it concatenated -> MLP (2 x 512, ReLU; ``model.hidden_size`` / ``model.num_layers``
  override width / depth) -> the hidden vector ``h``;
* action chunk: the toolkit's action head (continuous, binned or flow) on ``h + q_i`` for a learned
  per-step vector ``q_i`` (``action_queries``), i.e. one MLP predicts all H steps; the task head
  (task id, progress, waypoint) reads ``h``.

Why a subclass of :class:`VLAPolicy` and not a backbone behind it: ``VLAPolicy.forward`` builds a
token sequence for a sequence model; a CNN + MLP has none, and a backbone that ignored most of its
input would make the memory plan and the parameter metadata describe a model that does not run.
Everything outside ``forward`` is inherited unchanged: ``predict_action`` / ``select_action``
(history, chunk queue, temporal ensembling), the normalizer, ``save_pretrained`` /
``from_pretrained`` (config.json with ``arch.kind == "cnn"`` + safetensors), EMA and exact resume in
the training loop. ``backbone.depths()`` assigns every parameter a module (vision: the convs;
language: the instruction encoder; projector: the MLP and the state layer; heads) so discriminative
learning rates, layer decay, ``model.freeze`` and progressive unfreezing work as for other presets.

Not supported (:func:`unsupported_options`, checked before any data loads): LoRA, activation
checkpointing, FSDP (no transformer blocks to shard; DDP works), the ``grounding`` loss term (its heat
maps must find the object the instruction names; this CNN never sees the instruction), and the
transformer presets' knobs (``model.vision``, ``language``, ``vlm``, ``num_heads``,
``vision_pretrained``, ``model.extra`` keys of native presets).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vla_ft.config import MODEL_EXTRA_KNOBS, ModelConfig
from vla_ft.constants import (
    ACTION,
    IMAGES,
    INSTR_IDS,
    INSTR_MASK,
    MODULE_LANGUAGE,
    MODULE_PROJECTOR,
    MODULE_VISION,
    OUT_HIDDEN,
    STATE,
)
from vla_ft.errors import ConfigError
from vla_ft.models.backbone import Depths
from vla_ft.models.heads import ACTION_HEADS, TaskHead
from vla_ft.models.policy import ModelDims, VLAPolicy
from vla_ft.models.vision import SpatialSoftmax

KIND = "cnn"
# the architecture keys of a cnn preset (each overridable with model.extra.<key>)
ARCH_KEYS = MODEL_EXTRA_KNOBS[KIND]
# model.extra knobs of the native (timm + language model) presets, meaningless here
NATIVE_KNOBS = tuple(k for k in MODEL_EXTRA_KNOBS["native"] if k not in ARCH_KEYS)
CHECKPOINTING = (
    "model.gradient_checkpointing=true does not apply to a bc-cnn policy (a small CNN + MLP with no "
    "transformer layers to recompute): set model.gradient_checkpointing=false"
)


def resolve_cnn_arch(preset_arch: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """The architecture to build: the preset's values, ``model.extra`` overrides, and
    ``model.hidden_size`` / ``model.num_layers`` as the MLP's width / depth.

    Raises:
        ConfigError: a model option bc-cnn has no use for (the first), or an invalid architecture value.
    """
    problems = model_problems(cfg)
    if problems:  # the first (the trainer's preflight lists them all, vla_ft/train/finetune.py)
        raise ConfigError(problems[0])
    arch: dict[str, Any] = {"kind": KIND, **copy.deepcopy(preset_arch)}
    knobs = cfg.extra.to_dict()
    arch.update({key: knobs[key] for key in ARCH_KEYS if key in knobs})
    if cfg.hidden_size is not None:
        arch["width"] = cfg.hidden_size
    if cfg.num_layers is not None:
        arch["depth"] = cfg.num_layers
    check_arch(arch)
    return arch


def check_arch(arch: dict[str, Any]) -> None:
    """Every architecture value usable (one ConfigError naming the ``model.extra`` key otherwise)."""

    def positive_ints(value: Any) -> bool:
        return isinstance(value, list) and len(value) > 0 and all(type(v) is int and v >= 1 for v in value)

    if not positive_ints(arch["channels"]):
        raise ConfigError(
            f"model.extra.channels={arch['channels']!r}: give a list of conv widths >= 1, e.g. [32, 32, 64, 64]"
        )
    if not positive_ints(arch["strides"]) or len(arch["strides"]) != len(arch["channels"]):
        raise ConfigError(
            f"model.extra.strides={arch['strides']!r}: give one stride >= 1 per conv layer "
            f"({len(arch['channels'])}, as model.extra.channels), e.g. [2, 1, 2, 1]"
        )
    for key in ARCH_KEYS[2:]:  # the sizes
        value = arch[key]
        if type(value) is not int or value < 1:
            name = {"width": "model.hidden_size", "depth": "model.num_layers"}.get(key, f"model.extra.{key}")
            raise ConfigError(f"{name}={value!r}: bc-cnn needs an integer >= 1 here")


def model_problems(cfg: ModelConfig) -> list[str]:
    """``model`` options that mean nothing for a freshly built bc-cnn policy, one message each."""
    found = []
    for key, value, fix in (
        ("model.vision", cfg.vision, "its conv encoder is its own, not a timm model"),
        ("model.vision_pretrained", cfg.vision_pretrained, "it has no timm encoder to load weights into"),
        ("model.language", cfg.language, "it has no language model"),
        ("model.vlm", cfg.vlm, "it has no vision-language model"),
        ("model.num_heads", cfg.num_heads, "it has no attention"),
    ):
        if value is not None:
            found.append(f"{key}={value!r} does not apply to model.preset=bc-cnn ({fix}): set {key}=null")
    native = [k for k in NATIVE_KNOBS if getattr(cfg.extra, k) is not None]
    if native:
        found.append(
            f"model.extra has {', '.join(native)}, knobs of the native (timm + language model) presets; "
            f"bc-cnn's are {', '.join(ARCH_KEYS[:-1])}: remove them"
        )
    if cfg.gradient_checkpointing:
        found.append(CHECKPOINTING)
    return found


def lora_problem(r: int) -> str:
    """The message for ``model.lora.r > 0`` on a bc-cnn policy (also raised by ``apply_lora``)."""
    return (
        f"model.lora.r={r} does not apply to a bc-cnn policy (LoRA adapts the layers of a pretrained "
        f"backbone; this baseline trains all of its ~2M parameters from scratch): set model.lora.r=0"
    )


def unsupported_options(cfg: Any, fresh: bool = True) -> list[str]:
    """Every option of a run config (``vla_ft.config.Config``) a bc-cnn policy cannot honour.

    Args:
        cfg: the run config.
        fresh: the policy is built from the preset (``model.pretrained`` null); when it is loaded
            from a checkpoint, the architecture fields come from the checkpoint and are not checked.
    """
    if fresh:
        found = model_problems(cfg.model)
    else:
        found = [CHECKPOINTING] if cfg.model.gradient_checkpointing else []
    if cfg.model.lora.r > 0:
        found.append(lora_problem(cfg.model.lora.r))
    if "grounding" in cfg.loss.task_terms:
        found.append(
            "loss.task_terms.grounding needs keypoint heat maps that find the object the instruction names; "
            "bc-cnn's CNN never sees the instruction: drop 'grounding' from loss.task_terms (task_id, "
            "progress and waypoint work)"
        )
    if cfg.train.parallel == "fsdp":
        found.append(
            "train.parallel=fsdp does not apply to a bc-cnn policy (FSDP shards transformer blocks; it has "
            "none): use train.parallel=ddp or none"
        )
    return found


class ConvEncoder(nn.Module):
    """One camera's images -> (N, keypoint_features + channels[-1]) features.

    3x3 conv-ReLU layers, then spatial-softmax keypoints of the last map (where) next to its global
    average (what). Input pixels in [0, 1] are mapped to [-1, 1]."""

    def __init__(self, channels: list[int], strides: list[int], keypoints: int, keypoint_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c, s in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=s, padding=1), nn.ReLU(inplace=True)]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.keypoints = SpatialSoftmax(c_in, keypoints, keypoint_features)
        self.out_dim = keypoint_features + c_in

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W) in [0, 1] -> (N, out_dim)."""
        feats = self.convs(images * 2.0 - 1.0)  # (N, C, h, w)
        points, _ = self.keypoints(feats)  # (N, 1, keypoint_features)
        return torch.cat([points[:, 0], feats.mean(dim=(2, 3))], dim=-1)


class InstructionEncoder(nn.Module):
    """Instruction tokens -> (B, text_features): token + position embedding, a per-token ReLU layer,
    the mean over real tokens (positions past ``max_tokens - 1`` share the last position)."""

    def __init__(self, vocab_size: int, features: int, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.tokens = nn.Embedding(vocab_size, features)
        self.positions = nn.Embedding(max_tokens, features)
        self.mix = nn.Linear(features, features)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """int (B, L) ids + (B, L) mask (1 = real token) -> (B, text_features)."""
        pos = torch.arange(ids.shape[1], device=ids.device).clamp_max(self.max_tokens - 1)
        h = F.relu(self.mix(self.tokens(ids) + self.positions(pos)))  # (B, L, E)
        weights = mask.to(h.dtype)[..., None]
        return (h * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class CNNBackbone(nn.Module):
    """The encoders and the MLP trunk of a bc-cnn policy (the state layer and heads live on the
    policy, under the names the checkpoint loader re-initializes when the data's dims change).

    Args:
        arch: the resolved architecture (:func:`resolve_cnn_arch`).
        cameras: K, one encoder each.
        views: frames x cameras features in the MLP input.
        state_features: width of the policy's state layer output (0: no proprio).
        dropout: after every MLP layer (``model.dropout``).
    """

    heatmap_count = 0  # VLAPolicy.heatmaps / the probe: no keypoint maps tied to the instruction
    conditions_vision = False

    def __init__(
        self, arch: dict[str, Any], cameras: int, views: int, state_features: int, dropout: float
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(
            ConvEncoder(arch["channels"], arch["strides"], arch["keypoints"], arch["keypoint_features"])
            for _ in range(cameras)
        )
        self.text = InstructionEncoder(arch["vocab_size"], arch["text_features"], arch["max_tokens"])
        width, depth = int(arch["width"]), int(arch["depth"])
        d_in = views * self.encoders[0].out_dim + state_features + arch["text_features"]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Linear(d_in if i == 0 else width, width),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
        self.trunk = nn.Sequential(*layers)
        self.hidden_size = width
        self.vocab_size = int(arch["vocab_size"])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float (B, T, K, 3, H, W) in [0, 1] -> (B, T * K * F) features, camera k by encoder k."""
        b, t, k = images.shape[:3]
        frames = images.reshape(b * t, k, *images.shape[3:])
        feats = torch.stack([enc(frames[:, i]) for i, enc in enumerate(self.encoders)], dim=1)  # (B*T, K, F)
        return feats.reshape(b, -1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(ids, mask)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d_in) concatenated features -> (B, width) hidden vector."""
        return self.trunk(features)

    def depths(self) -> Depths:
        """Module, depth and layer count of every parameter (names relative to this module): conv
        layer i of every camera at vision depth i, the keypoint readout on top; the instruction
        encoder's embeddings at language depth 0, its per-token layer at 1; the MLP as projector."""
        out: Depths = {}
        n_conv = len(self.encoders[0].convs) // 2
        for name, _ in self.encoders.named_parameters():
            parts = name.split(".")  # <camera>.convs.<index>.weight or <camera>.keypoints.<...>
            depth = int(parts[2]) // 2 if parts[1] == "convs" else n_conv
            out[f"encoders.{name}"] = (MODULE_VISION, depth, n_conv + 1)
        for name, _ in self.text.named_parameters():
            out[f"text.{name}"] = (MODULE_LANGUAGE, 1 if name.startswith("mix.") else 0, 2)
        for name, _ in self.trunk.named_parameters():
            out[f"trunk.{name}"] = (MODULE_PROJECTOR, 0, 1)
        return out


class BCCNNPolicy(VLAPolicy):
    """A plain CNN behaviour-cloning policy behind the :class:`VLAPolicy` interface (module docstring).

    Args:
        cfg: the model config (head type, bins, dropout, inference options).
        dims: data shapes.
        arch: the resolved architecture (saved in config.json to rebuild the model).
        tokenizer: the instruction tokenizer (the byte-level one; ids below ``arch["vocab_size"]``).
    """

    def __init__(self, cfg: ModelConfig, dims: ModelDims, arch: dict[str, Any], tokenizer: Any) -> None:
        nn.Module.__init__(self)
        self.cfg, self.dims, self.tokenizer, self.arch = cfg, dims, tokenizer, arch
        self.normalizer: Any = None
        s = dims.history * dims.state_dim
        state_features = int(arch["state_features"]) if s > 0 else 0
        self.state_proj = nn.Linear(s, state_features) if s > 0 else None
        self.backbone = CNNBackbone(
            arch, len(dims.image_keys), dims.history * len(dims.image_keys), state_features, cfg.dropout
        )
        d = self.backbone.hidden_size
        self.action_queries = nn.Parameter(torch.randn(dims.chunk, d) * 0.02)  # per chunk step
        self.action_head = ACTION_HEADS[cfg.action_head](
            d, dims.action_dim, n_bins=cfg.n_bins, bin_range=cfg.bin_range, decode=cfg.bin_decode
        )
        self.task_head = TaskHead(d, dims.num_tasks)
        self.reset()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predict the normalized action chunk and task outputs; the batch is not modified.

        Args:
            batch: IMAGES uint8 (B, T, K, 3, H, W), STATE (B, T, S), INSTR_IDS/INSTR_MASK (B, L)
                (+ ACTION (B, H, A) for the flow head's training output).

        Returns:
            OUT_ACTION (B, H, A) [+ OUT_ACTION_LOGITS / OUT_FLOW_ERR by head], OUT_TASK_LOGITS (B, NT),
            OUT_PROGRESS (B,), OUT_WAYPOINT (B, 3), OUT_HIDDEN (B, 1, D): the MLP's output.
        """
        images = batch[IMAGES]
        b = images.shape[0]
        feats = self.backbone.encode_images(images.float() / 255.0)
        parts = [feats]
        if self.state_proj is not None:
            parts.append(self.state_proj(batch[STATE].reshape(b, -1).to(feats.dtype)))
        parts.append(self.backbone.encode_text(batch[INSTR_IDS], batch[INSTR_MASK]).to(feats.dtype))
        hidden = self.backbone(torch.cat(parts, dim=-1))  # (B, D)
        queries = (hidden[:, None] + self.action_queries[None].to(hidden.dtype)).float()  # (B, H, D)
        if self.cfg.action_head == "flow":  # trains on the target chunk when the batch has one
            out = dict(self.action_head(queries, batch.get(ACTION), self.cfg.flow_steps))
        else:
            out = dict(self.action_head(queries))
        out.update(self.task_head(hidden.float()))
        out[OUT_HIDDEN] = hidden[:, None]
        return out

    def lora_problem(self, r: int) -> str | None:
        return lora_problem(r)

    def set_gradient_checkpointing(self, enable: bool) -> None:
        """Nothing to recompute: off is a no-op, on a ConfigError (the trainer calls it either way)."""
        if enable:
            raise ConfigError(CHECKPOINTING)


def build_bc_cnn(cfg: ModelConfig, dims: ModelDims, arch: dict[str, Any]) -> BCCNNPolicy:
    """A bc-cnn policy with random weights (all trainable) for ``arch`` and the byte tokenizer.

    Raises:
        ConfigError: ``model.gradient_checkpointing`` is on, or the architecture is invalid.
    """
    from vla_ft.models.tokenizer import byte_tokenizer, check_vocab

    check_arch(arch)
    if cfg.gradient_checkpointing:
        raise ConfigError(CHECKPOINTING)
    tokenizer = byte_tokenizer()
    check_vocab(tokenizer, int(arch["vocab_size"]), "model.extra.vocab_size")
    return BCCNNPolicy(cfg, dims, arch, tokenizer)
