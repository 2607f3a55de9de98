"""What the memory plan needs to know about a policy, read off a copy built on the meta device.

Transformer stacks (the language model; an HF VLM's vision tower) are described by their
dimensions and estimated with closed forms per token and layer (decoder, Llama-like: ``4 (10 d +
4 f + h + N + 2)`` bytes at fp32, ``34 d + 8 f + 4 h + 2 N + 8`` under bf16 autocast: fp32 norms,
a separate bf16 cast of the norm output for each projection, bf16 q/k/v/MLP tensors; encoder,
ViT-like: ``4 (8 d + 2 f + h + 4)`` / ``24 d + 4 f + 4 h + 16``; with activation checkpointing a
layer keeps its fp32 input, ``4 d``). ``N`` is the attention mask row SDPA saves per layer.
Everything else (timm vision encoders, CNN or ViT; projectors and connectors; heads) is traced: its
forward runs on the meta device under ``torch.autograd.graph.saved_tensors_hooks`` and the saved
storages are summed (exact at fp32; halved for bf16). The closed forms were derived from and are
checked against autograd's saved tensors on the CPU (tests/train/test_memory.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_ft import constants as K
from vla_ft.config import Config
from vla_ft.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Activations of transformer stacks (closed forms) and of everything else (meta traces)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """Dimensions of a transformer stack. ``kind``: ``decoder`` (RMSNorm, gated MLP, RoPE, causal
    mask) or ``encoder`` (LayerNorm, two-layer MLP, no mask)."""

    kind: str
    layers: int
    hidden: int
    ffn: int
    heads: int

    def act_bytes(self, ctx_tokens: int, bf16: bool) -> float:
        """Bytes saved for backward per token and layer (``ctx_tokens``: the attention mask row)."""
        d, f, h = self.hidden, self.ffn, self.heads
        if self.kind == "decoder":
            return (
                34 * d + 8 * f + 4 * h + 2 * ctx_tokens + 8
                if bf16
                else 4 * (10 * d + 4 * f + h + ctx_tokens + 2)
            )
        return 24 * d + 4 * f + 4 * h + 16 if bf16 else 4 * (8 * d + 2 * f + h + 4)

    def ckpt_bytes(self) -> float:
        """Bytes kept per token and layer under activation checkpointing: the fp32 layer input."""
        return 4.0 * self.hidden


def _stack(config: Any, kind: str) -> Stack:
    return Stack(
        kind,
        int(config.num_hidden_layers),
        int(config.hidden_size),
        int(config.intermediate_size),
        int(config.num_attention_heads),
    )


def saved_bytes(fn, params: list[nn.Parameter]) -> tuple[int, Any]:
    """Run ``fn()`` and sum the distinct storages autograd saves for backward (parameters
    excluded). Works on the meta device (storages told apart by identity, not address)."""
    own = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# --------------------------------------------------------------------------------------------
# The architecture, read off a policy built on the meta device
# --------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One stretch of the backward (from the output down): its trainable parameters and the
    activation bytes per sample it frees. ``layers`` > 1: that many identical units."""

    name: str
    params: int  # trainable weights (gradients)
    matmul_params: int  # weights bf16 autocast saves a copy of (per step, not per sample)
    acts: float  # bytes per sample at fp32 (traced, or the closed form)
    acts_bf16: float  # bytes per sample under bf16 autocast (without the weight copies)
    acts_ckpt: float  # kept under activation checkpointing (fp32 layer inputs)
    layers: int = 1
    checkpointable: bool = False
    acts_ckpt_bf16: float | None = None  # kept under checkpointing with bf16 (None: acts_ckpt)


@dataclass
class Arch:
    """What the plan needs to know about a policy."""

    name: str
    params: int
    tensor_numels: list[int]  # trainable tensors (8-bit optimizer state rounds per tensor)
    units: list[Unit]
    tokens: dict[str, int]
    root_params: int  # FSDP root unit (everything outside the transformer blocks)
    block_params: int  # the largest transformer block
    largest_tensor: int


def _matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def describe(policy: nn.Module, data_tokens: dict[str, int]) -> Arch:
    """Read the units of ``policy`` (built on the meta device) for the plan.

    Args:
        policy: a ``VLAPolicy`` on the meta device (``build_policy`` under ``torch.device("meta")``).
        data_tokens: ``views`` (frames x cameras), ``instruction`` (padded length L), ``chunk`` (H),
            ``state`` (1 with proprio, else 0), ``image_size`` (side in px).
    """
    from vla_ft.models import param_info
    from vla_ft.train.distributed import transformer_blocks

    if policy.arch.get("kind") == "smolvla":
        return _describe_smolvla(policy, data_tokens)
    if policy.arch.get("kind") == "cnn":
        return _describe_bc_cnn(policy, data_tokens)
    bb, info = policy.backbone, param_info(policy)
    params = {n: p for n, p in policy.named_parameters()}
    views, size = data_tokens["views"], data_tokens["image_size"]
    units: list[Unit] = []
    heads = [n for n, i in info.items() if i.module == K.MODULE_HEADS]
    d = bb.hidden_size
    h_acts, _ = saved_bytes(
        lambda: (policy.action_head(torch.zeros(1, policy.dims.chunk, d, device="meta", requires_grad=True)),
                 policy.task_head(torch.zeros(1, d, device="meta", requires_grad=True))),
        list(policy.parameters()),
    )  # fmt: skip
    head_mm = _matmul_params(policy.action_head) + _matmul_params(policy.task_head)
    units.append(Unit("heads", sum(params[n].numel() for n in heads), head_mm, h_acts, h_acts / 2, h_acts))
    native = policy.arch["kind"] == "native"
    vision_params = list(bb.vision.parameters()) if native else []

    if native:  # timm encoder (traced) + MLP projector (traced)
        lm_cfg, vision = bb.language.model.config, bb.vision
        cond = torch.zeros(1, d, device="meta") if bb.conditions_vision else None
        image = torch.zeros(1, 3, size, size, device="meta")
        run = lambda: vision(image, cond) if cond is not None else vision(image)  # noqa: E731
        vision.set_gradient_checkpointing(False)  # the policy may have been built with it on
        v_acts, feats = saved_bytes(run, vision_params)
        vision.set_gradient_checkpointing(True)
        v_ckpt, _ = saved_bytes(run, vision_params)
        vision.set_gradient_checkpointing(bool(policy.cfg.gradient_checkpointing))
        image_tokens = int(feats.shape[1])
        p_acts, _ = saved_bytes(
            lambda: bb.projector(feats.detach().requires_grad_()), list(bb.projector.parameters())
        )
        vision_mm, proj_mm = _matmul_params(vision), _matmul_params(bb.projector)
        vision_stack = None
    else:  # HF VLM: vision tower (closed form) + connector (traced)
        vcfg, lm_cfg = bb.model.config.vision_config, bb.model.config.get_text_config()
        vision_stack = _stack(vcfg, "encoder")
        patches = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
        tower = bb._part(bb.vision_attr)
        hidden = torch.zeros(1, patches, vision_stack.hidden, device="meta", requires_grad=True)
        connector = bb._part(bb.proj_attr)
        p_acts, out = saved_bytes(lambda: connector(hidden), list(connector.parameters()))
        image_tokens = int(out.shape[1])
        pixels = 4.0 * 3 * int(vcfg.image_size) ** 2  # the patch convolution's (resized) input
        post = 4.0 * patches * (vision_stack.hidden + 2)  # final layer norm
        v_acts = v_ckpt = pixels + post
        vision_mm, proj_mm = _matmul_params(tower), _matmul_params(bb._part(bb.proj_attr))
    lm = _stack(lm_cfg, "decoder")
    n_tokens = (
        views * image_tokens + data_tokens["state"] + data_tokens["instruction"] + data_tokens["chunk"] + 1
    )
    film_tokens = data_tokens["instruction"] if bb.conditions_vision else 0

    def by_module(module: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for n, i in info.items():
            if i.module == module:
                out[i.depth] = out.get(i.depth, 0) + params[n].numel()
        return out

    lang, vis = by_module(K.MODULE_LANGUAGE), by_module(K.MODULE_VISION)
    lm_layer_params = max((v for k, v in lang.items() if 1 <= k <= lm.layers), default=0)
    top = 4.0 * (2 * lm.hidden + 1) + 2 * 4.0 * lm.hidden // lm.heads  # final norm + RoPE cos/sin
    units.append(Unit("lm final norm", lang.get(lm.layers + 1, 0), 0, top * n_tokens, top * n_tokens,
                      top * n_tokens))  # fmt: skip
    tok = n_tokens + film_tokens
    units.append(
        Unit(
            "lm layer",
            lm_layer_params,
            lm_layer_params,  # all but the norms' weights are matmuls
            lm.act_bytes(n_tokens, False) * tok,
            lm.act_bytes(n_tokens, True) * tok,
            lm.ckpt_bytes() * tok,
            layers=lm.layers,
            checkpointable=True,
        )
    )
    units.append(Unit("lm embeddings", lang.get(0, 0), 0, 0.0, 0.0, 0.0))
    proj = sum(p.numel() for n, p in params.items() if info[n].module == K.MODULE_PROJECTOR)
    units.append(Unit("projector", proj, proj_mm, p_acts * views, p_acts * views / 2, p_acts * views))
    vis_total = sum(vis.values())
    if vision_stack is not None:
        v_layer = max((v for k, v in vis.items() if 1 <= k <= vision_stack.layers), default=0)
        units.append(
            Unit(
                "vision layer",
                v_layer,
                v_layer,
                vision_stack.act_bytes(0, False) * patches * views,
                vision_stack.act_bytes(0, True) * patches * views,
                vision_stack.ckpt_bytes() * patches * views,
                layers=vision_stack.layers,
                checkpointable=True,
            )
        )
        vis_total -= v_layer * vision_stack.layers
    units.append(
        # a timm encoder checkpoints its own stages: its traced kept bytes; the recompute transient
        # is taken as the whole encoder's activations (an upper bound: timm rebuilds one stage at a time)
        Unit("vision", vis_total, vision_mm if vision_stack is None else 0, v_acts * views, v_acts * views / 2,
             v_ckpt * views, checkpointable=vision_stack is None, acts_ckpt_bf16=v_ckpt * views / 2)
    )  # fmt: skip
    blocks = transformer_blocks(policy)
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    trainable = [p for p in policy.parameters() if p.requires_grad]
    total = sum(p.numel() for p in policy.parameters())
    tokens = {"image_tokens_per_view": image_tokens, "views": views, "sequence": n_tokens}
    if vision_stack is not None:
        tokens["vision_patches_per_view"] = patches
    return Arch(
        name=str(policy.cfg.preset),
        params=total,
        tensor_numels=[p.numel() for p in trainable],
        units=units,
        tokens=tokens,
        root_params=total - sum(block_sizes),
        block_params=max(block_sizes, default=0),
        largest_tensor=max((p.numel() for p in trainable), default=0),
    )


def _describe_bc_cnn(policy: nn.Module, data_tokens: dict[str, int]) -> Arch:
    """A bc-cnn policy (vla_ft/models/bc_cnn.py): its whole training forward traced on the meta
    device for one sample, as one unit (exact at fp32; bf16 taken as half, plus autocast's weight
    copies). No transformer blocks: nothing to checkpoint or to shard."""
    d = policy.dims
    h, w = d.image_size
    views = d.history * len(d.image_keys)
    batch = {
        K.IMAGES: torch.zeros(1, d.history, len(d.image_keys), 3, h, w, dtype=torch.uint8, device="meta"),
        K.STATE: torch.zeros(1, d.history, d.state_dim, device="meta"),
        K.INSTR_IDS: torch.zeros(1, data_tokens["instruction"], dtype=torch.long, device="meta"),
        K.INSTR_MASK: torch.ones(1, data_tokens["instruction"], dtype=torch.long, device="meta"),
        K.ACTION: torch.zeros(1, d.chunk, d.action_dim, device="meta"),  # the flow head trains on it
    }
    params = list(policy.parameters())
    acts, _ = saved_bytes(lambda: policy(batch), params)
    trainable = [p for p in params if p.requires_grad]
    total = sum(p.numel() for p in params)
    unit = Unit(
        "bc-cnn (traced)", sum(p.numel() for p in trainable), _matmul_params(policy), acts, acts / 2, acts
    )
    return Arch(
        name=str(policy.cfg.preset),
        params=total,
        tensor_numels=[p.numel() for p in trainable],
        units=[unit],
        # one feature vector per view, fused with the state and the instruction into one vector
        tokens={"views": views, "image_tokens_per_view": 1, "sequence": 1},
        root_params=total,
        block_params=0,
        largest_tensor=max((p.numel() for p in trainable), default=0),
    )


def _describe_smolvla(policy: nn.Module, data_tokens: dict[str, int]) -> Arch:
    """A SmolVLA policy: its whole training forward traced on the meta device, as one unit.

    Exact at fp32 for the traced batch shape (one sample); bf16 is taken as half, plus autocast's
    weight copies. Activation checkpointing is not modeled (the plan is then an upper bound).
    """
    from vla_ft.train.distributed import transformer_blocks

    d = policy.dims
    h, w = d.image_size
    batch = {
        K.IMAGES: torch.zeros(1, 1, len(d.image_keys), 3, h, w, dtype=torch.uint8, device="meta"),
        K.STATE: torch.zeros(1, 1, d.state_dim, device="meta"),
        K.INSTR_IDS: torch.zeros(1, data_tokens["instruction"], dtype=torch.long, device="meta"),
        K.INSTR_MASK: torch.ones(1, data_tokens["instruction"], dtype=torch.long, device="meta"),
        K.ACTION: torch.zeros(1, d.chunk, d.action_dim, device="meta"),
        K.ACTION_IS_PAD: torch.zeros(1, d.chunk, dtype=torch.bool, device="meta"),
    }
    params = list(policy.parameters())
    model = policy.backbone
    # the vision tower by the encoder closed form (transformers' masking reads values, which meta
    # tensors do not have); the connector onwards traced, fed tower-shaped features
    vcfg = model.arch.vlm_config.vision_config
    tower = _stack(vcfg, "encoder")
    side = model.arch.resize_hw[0] if model.arch.resize_hw else int(vcfg.image_size)
    patches = (side // int(vcfg.patch_size)) ** 2
    v_acts = tower.act_bytes(0, False) * patches * tower.layers + 4.0 * (
        3 * side * side + patches * (tower.hidden + 2)
    )
    v_bf16 = tower.act_bytes(0, True) * patches * tower.layers + 4.0 * (
        3 * side * side + patches * (tower.hidden + 2)
    )
    model.embed_image = lambda px: model.connector(
        torch.zeros(px.shape[0], patches, tower.hidden, device="meta", requires_grad=True)
    )
    checkpointing = model.gradient_checkpointing
    model.gradient_checkpointing = False
    try:
        acts, _ = saved_bytes(lambda: policy(batch)[K.OUT_FLOW_ERR], params)
    finally:
        del model.embed_image
        model.gradient_checkpointing = checkpointing
    trainable = [p for p in params if p.requires_grad]
    total = sum(p.numel() for p in params)
    vision = sum(p.numel() for p in model.vision.parameters() if p.requires_grad)
    cams = len(d.image_keys)
    img_tokens = patches // int(model.arch.vlm_config.scale_factor) ** 2
    blocks = [sum(p.numel() for p in b.parameters()) for b in transformer_blocks(policy)]
    rest_mm = _matmul_params(model) - _matmul_params(model.vision)
    units = [
        Unit(
            "smolvla layers (traced)",
            sum(p.numel() for p in trainable) - vision,
            rest_mm,
            acts,
            acts / 2,
            acts,
        ),
        Unit(
            "vision tower", vision, _matmul_params(model.vision), v_acts * cams, v_bf16 * cams, v_acts * cams
        ),
    ]
    return Arch(
        name="smolvla",
        params=total,
        tensor_numels=[p.numel() for p in trainable],
        units=units,
        tokens={
            "views": cams,
            "image_tokens_per_view": img_tokens,
            "vision_patches_per_view": patches,
            "sequence": cams * img_tokens + data_tokens["instruction"] + 1 + d.chunk,
        },
        root_params=total - sum(blocks),
        block_params=max(blocks, default=0),
        largest_tensor=max((p.numel() for p in trainable), default=0),
    )


# --------------------------------------------------------------------------------------------
# From a config: the policy on the meta device
# --------------------------------------------------------------------------------------------


def _hf_config_dict(spec: str, key: str) -> dict[str, Any]:
    """A transformers config (``config.json`` only: a local directory or a hub id) as a dict."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{key}={spec!r}: cannot read its config.json ({exc}); give a directory holding the model's "
            f"config.json (no weights needed) or a preset"
        ) from None
    return {"model_type": config.model_type, **config.to_diff_dict()}


def config_arch(cfg: Config) -> dict[str, Any]:
    """The architecture dict ``build_policy`` takes, without reading any weights: a checkpoint of
    ours gives its saved architecture; HF backbones named by directory or hub id give their
    config.json (so ``build_policy(..., arch=...)`` builds them with random weights)."""
    import json

    from vla_ft.models.loading import resolve_arch

    if cfg.model.pretrained is not None:
        from vla_ft.models.source import resolve_pretrained

        meta_file = Path(resolve_pretrained(cfg.model.pretrained)) / "config.json"
        from vla_ft.models.smolvla_policy import is_smolvla_dir

        if is_smolvla_dir(meta_file.parent):
            return {"kind": "smolvla", "path": str(meta_file.parent)}
        if not meta_file.is_file():
            raise ConfigError(
                f"model.pretrained={cfg.model.pretrained!r}: no config.json there to plan from; give a local "
                f"checkpoint directory, or plan the architecture with model.pretrained=null model.preset=..."
            )
        return json.loads(meta_file.read_text())["arch"]
    arch = resolve_arch(dataclasses.replace(cfg.model, vision_pretrained=None))
    if arch["kind"] == "vlm" and isinstance(arch["vlm"], str):
        arch["vlm"] = _hf_config_dict(arch["vlm"], "model.vlm")
    if arch["kind"] == "native" and isinstance(arch["language"], str):
        arch["language"] = _hf_config_dict(arch["language"], "model.language")
    return arch


def meta_policy(cfg: Config, dims: Any) -> nn.Module:
    """``cfg.model`` built on the meta device with ``dims`` (a ``ModelDims``); no weights read."""
    from vla_ft.models.loading import build_policy

    model_cfg = dataclasses.replace(cfg.model, pretrained=None, vision_pretrained=None)
    arch = config_arch(cfg)
    if arch["kind"] == "smolvla":
        return smolvla_meta_policy(arch["path"], cfg.model, dims)
    with torch.device("meta"):
        policy = build_policy(model_cfg, dims, arch=arch)
    policy.train()
    return policy


def smolvla_meta_policy(path: str, model_cfg: Any, dims: Any) -> nn.Module:
    """A SmolVLA checkpoint's architecture on the meta device (its configs read, no weights)."""
    from vla_ft.models.smolvla import SmolVLAModel
    from vla_ft.models.smolvla_io import (
        _check_config,
        _load_vlm_config,
        _read_json,
        arch_from_lerobot_config,
        resolve_vlm_dir,
    )
    from vla_ft.models.smolvla_policy import SmolVLAPolicy

    ckpt = Path(path)
    cfg = _check_config(_read_json(ckpt / "config.json", "the SmolVLA config"), ckpt / "config.json")
    arch = arch_from_lerobot_config(cfg, _load_vlm_config(resolve_vlm_dir(ckpt, cfg, model_cfg.vlm)))
    with torch.device("meta"):
        model = SmolVLAModel(arch)
    dims = dataclasses.replace(dims, chunk=arch.chunk_size, history=1)
    policy = SmolVLAPolicy(
        dataclasses.replace(model_cfg, pretrained=path, action_head="flow"), dims, model, None
    )
    policy.set_gradient_checkpointing(bool(model_cfg.gradient_checkpointing))
    policy.train()
    return policy


def data_dims(cfg: Config):
    """Model dims the config's data would give (cameras from data.image_keys or env.cameras)."""
    from vla_ft.models import ModelDims

    keys = cfg.data.image_keys or [f"{c}_image" for c in cfg.env.cameras]
    size = cfg.data.image_size or cfg.env.image_size
    return ModelDims(
        action_dim=4,
        state_dim=5,
        image_keys=list(keys),
        state_keys=["ee_pos", "gripper_qpos"],
        image_size=(size, size),
        history=cfg.data.history,
        chunk=cfg.data.chunk,
    )


def data_tokens(cfg: Config, dims: Any) -> dict[str, int]:
    return {
        "views": dims.history * len(dims.image_keys),
        "instruction": cfg.data.instruction_max_tokens,
        "chunk": dims.chunk,
        "state": 1 if dims.state_dim > 0 else 0,
        "image_size": int(dims.image_size[0]),
    }
