"""SmolVLA (LeRobot's vision-language-action policy) re-implemented as a plain ``nn.Module``.

Numerically this follows lerobot 0.6.1 (``tests/fixtures/lerobot/`` holds a checkpoint and reference
tensors written by it; ``tests/models/test_smolvla.py`` compares every stage). The model has two
token streams that run through interleaved transformer layers:

* the **prefix** (VLM stream, width ``d``): per camera the SmolVLM vision tower + connector
  (``d ** 0.5``-scaled image tokens), the language tokens (``d ** 0.5``-scaled embeddings) and one
  projected robot-state token;
* the **suffix** (action-expert stream, width ``d * expert_width_multiplier``): one token per chunk
  step built from the noisy action and a sine/cosine embedding of the flow time.

Layer ``i`` pairs VLM layer ``i`` with expert layer ``i``. In a *self-attention* layer (every
``self_attn_every_n_layers``-th, starting at 0) both streams are concatenated and attend jointly,
each with its own projections, norms and MLP. In a *cross-attention* layer the VLM attends to its
own stream only, and the expert's queries attend to that layer's VLM keys (already rotated) and
values, re-projected to the expert by its own ``k_proj``/``v_proj``.

Attention masks follow the big_vision convention: each token carries a flag, a token sees every
valid token whose running flag count is <= its own. Images and language share flag 0 (they see
each other), the state token opens a block, and every action token opens one (causal chunk).
Positions count valid tokens only; RoPE is the half-split variant computed in float32.

Reused from transformers: ``SmolVLMVisionTransformer``, ``SmolVLMConnector``, ``LlamaRMSNorm`` and
``LlamaMLP``; attention and RoPE are implemented here because SmolVLA's differ from HF's.

Parameter names map one-to-one onto LeRobot's ``model.safetensors`` keys with
:func:`to_lerobot_key` / :func:`from_lerobot_key` (LeRobot's unused ``lm_head`` is not part of this
module; ``vla_ft.models.smolvla_io`` carries it through load/save).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMConfig
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

from vla_ft.models.flow import (
    euler_integrate,
    masked_flow_loss,
    noisy_actions,
    sample_noise,
    sample_time,
    time_embedding,
)

# Our module prefix -> LeRobot state-dict prefix. Order matters only for readability; the
# prefixes are disjoint on both sides, so the mapping is a bijection on parameter names.
LEROBOT_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision.", "model.vlm_with_expert.vlm.model.vision_model."),
    ("connector.", "model.vlm_with_expert.vlm.model.connector."),
    ("embed_tokens.", "model.vlm_with_expert.vlm.model.text_model.embed_tokens."),
    ("vlm_layers.", "model.vlm_with_expert.vlm.model.text_model.layers."),
    ("vlm_norm.", "model.vlm_with_expert.vlm.model.text_model.norm."),
    ("expert_layers.", "model.vlm_with_expert.lm_expert.layers."),
    ("expert_norm.", "model.vlm_with_expert.lm_expert.norm."),
    ("state_proj.", "model.state_proj."),
    ("action_in_proj.", "model.action_in_proj."),
    ("action_out_proj.", "model.action_out_proj."),
    ("action_time_mlp_in.", "model.action_time_mlp_in."),
    ("action_time_mlp_out.", "model.action_time_mlp_out."),
)
# In LeRobot's file but not computed by SmolVLA (the VLM's language-model head).
LEROBOT_UNUSED_KEYS = ("model.vlm_with_expert.vlm.lm_head.weight",)


def to_lerobot_key(name: str) -> str:
    """Our state-dict name -> LeRobot ``model.safetensors`` key (KeyError if it has no counterpart)."""
    for ours, theirs in LEROBOT_KEY_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def from_lerobot_key(key: str) -> str:
    """LeRobot ``model.safetensors`` key -> our state-dict name (KeyError if it has no counterpart)."""
    for ours, theirs in LEROBOT_KEY_PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    raise KeyError(key)


def expert_ffn_width(hidden: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """Action-expert MLP width: ``multiplier * int(2*hidden/3)`` rounded up to ``multiple_of``."""
    width = int(multiplier * int(2 * hidden / 3))
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


@dataclass
class SmolVLAArch:
    """Every hyper-parameter of the SmolVLA network (LeRobot ``SmolVLAConfig`` names where they exist).

    Attributes:
        vlm_config: the SmolVLM config (``vlm/config.json``: Llama text model + vision tower); a
            dict is converted. Only its architecture is used, no weights.
        chunk_size: action steps predicted per call (suffix length).
        max_state_dim / max_action_dim: state / action vectors are zero-padded to these widths.
        num_vlm_layers: first N text layers of the VLM used (<= 0: all of them).
        num_expert_layers: expert depth; <= 0 means "as many as the VLM" (the only supported mode).
        self_attn_every_n_layers: layer i is joint self-attention iff ``n > 0 and i % n == 0``,
            otherwise cross-attention.
        expert_width_multiplier: expert hidden = ``int(d * multiplier)``.
        num_steps: Euler steps at inference.
        min_period / max_period: range of the time embedding's periods.
        tokenizer_max_length: language tokens are truncated to this length (by the processor).
        resize_hw: (height, width) the cameras are resized-with-padding to; None keeps them.
            (LeRobot's ``resize_imgs_with_padding`` is (width, height).)
        empty_cameras: how many missing cameras :meth:`SmolVLAModel.prepare_images` may fill.
        prefix_length: pad the prefix to this many tokens (<= 0: no padding).
        rope_max_wavelength: RoPE base (SmolVLA uses 10000 whatever the VLM config says).
        vision_attn_implementation: attention kernel of the vision tower ("sdpa" or "eager").
    """

    vlm_config: SmolVLMConfig | dict
    chunk_size: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_vlm_layers: int = 16
    num_expert_layers: int = -1
    self_attn_every_n_layers: int = 2
    expert_width_multiplier: float = 0.75
    num_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0
    tokenizer_max_length: int = 48
    resize_hw: tuple[int, int] | None = (512, 512)
    empty_cameras: int = 0
    prefix_length: int = -1
    rope_max_wavelength: float = 10_000.0
    vision_attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if isinstance(self.vlm_config, dict):
            self.vlm_config = SmolVLMConfig(**self.vlm_config)
        if self.resize_hw is not None:
            self.resize_hw = (int(self.resize_hw[0]), int(self.resize_hw[1]))
        text = self.text_config
        if getattr(text, "model_type", "llama") != "llama":
            raise ValueError(f"SmolVLA needs a Llama text model, got model_type={text.model_type!r}")
        if self.num_expert_layers > 0 and self.num_expert_layers != self.n_layers:
            raise ValueError(
                f"num_expert_layers={self.num_expert_layers} != {self.n_layers} VLM layers is not supported"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} attention heads are not a multiple of {self.kv_heads} kv heads")

    @property
    def text_config(self):
        return self.vlm_config.text_config

    @property
    def hidden(self) -> int:
        """VLM (prefix) width d."""
        return self.text_config.hidden_size

    @property
    def expert_hidden(self) -> int:
        return int(self.hidden * self.expert_width_multiplier)

    @property
    def heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.text_config.num_key_value_heads or self.heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.hidden // self.heads

    @property
    def n_layers(self) -> int:
        total = self.text_config.num_hidden_layers
        return min(self.num_vlm_layers, total) if self.num_vlm_layers > 0 else total

    def is_self_attn_layer(self, i: int) -> bool:
        n = self.self_attn_every_n_layers
        return n > 0 and i % n == 0


class Projections(nn.Module):
    """q/k/v/o projections of one attention block (``kv_in``: input width of k/v, default ``d``)."""

    def __init__(
        self, d: int, heads: int, kv_heads: int, head_dim: int, bias: bool, kv_in: int | None = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(d, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_in or d, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_in or d, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, H*D) -> (B, L, H, D)."""
        return x.view(*x.shape[:-1], -1, self.head_dim)


class Block(nn.Module):
    """Pre-norm decoder block: norm -> attention (run by the caller) -> residual; norm -> MLP -> residual.

    The model calls the methods below rather than ``forward``; FSDP2 unshards a block's parameters
    around each of them (``FSDP_METHODS``, registered by ``vla_ft.train.distributed.wrap_model``).
    """

    FSDP_METHODS = ("qkv", "cross_qkv", "finish")

    def __init__(self, text_cfg, heads: int, kv_heads: int, head_dim: int, kv_in: int | None = None):
        super().__init__()
        d = text_cfg.hidden_size
        self.input_layernorm = LlamaRMSNorm(d, eps=text_cfg.rms_norm_eps)
        self.self_attn = Projections(d, heads, kv_heads, head_dim, text_cfg.attention_bias, kv_in)
        self.post_attention_layernorm = LlamaRMSNorm(d, eps=text_cfg.rms_norm_eps)
        self.mlp = LlamaMLP(text_cfg)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed projections, each (B, L, heads, head_dim)."""
        x = self.input_layernorm(h)
        a = self.self_attn
        return a.split_heads(a.q_proj(x)), a.split_heads(a.k_proj(x)), a.split_heads(a.v_proj(x))

    def cross_qkv(self, h: Tensor, vlm_k: Tensor, vlm_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Expert queries from ``h``; keys/values re-projected from a VLM layer's (B, L, KV, D)."""
        a = self.self_attn
        q = a.split_heads(a.q_proj(self.input_layernorm(h)))
        k = a.split_heads(a.k_proj(vlm_k.reshape(*vlm_k.shape[:2], -1)))
        v = a.split_heads(a.v_proj(vlm_v.reshape(*vlm_v.shape[:2], -1)))
        return q, k, v

    def finish(self, h: Tensor, attended: Tensor) -> Tensor:
        """Output projection + residual, then the MLP + residual. ``attended``: (B, L, H*D)."""
        h = self.self_attn.o_proj(attended) + h
        return self.mlp(self.post_attention_layernorm(h)) + h


def rope(x: Tensor, positions: Tensor, max_wavelength: float = 10_000.0) -> Tensor:
    """Rotary embedding of (B, L, H, D) by integer positions (B, L), half-split layout, float32 math."""
    dtype = x.dtype
    x = x.to(torch.float32)
    half = x.shape[-1] // 2
    exponents = (2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**exponents
    radians = (positions[..., None].to(torch.float32) / timescale[None, None, :])[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)


def block_attention_mask(pad: Tensor, flags: Tensor) -> Tensor:
    """(B, L) validity + (B, L) block-start flags -> (B, L, L) bool: query i may see key j."""
    level = torch.cumsum(flags.to(torch.int64), dim=1)
    visible = level[:, None, :] <= level[:, :, None]
    return visible & (pad[:, None, :] & pad[:, :, None])


def resize_with_pad(img: Tensor, height: int, width: int, pad_value: float = 0.0) -> Tensor:
    """Fit (B, C, h, w) into (height, width) keeping the aspect ratio, padding LEFT and TOP.

    The scale is ``r = max(w/width, h/height)``, the resized size ``(int(h/r), int(w/r))``
    (bilinear, ``align_corners=False``, no antialias). Images already of the target size are
    returned as they are.
    """
    if img.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(img.shape)}")
    h, w = img.shape[2:]
    if (h, w) == (height, width):
        return img
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    out = F.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return F.pad(out, (max(0, width - new_w), 0, max(0, height - new_h), 0), value=pad_value)


def pad_last_dim(x: Tensor, width: int) -> Tensor:
    """Zero-pad the last dimension to ``width`` (error if it is wider)."""
    if x.shape[-1] > width:
        raise ValueError(f"last dimension {x.shape[-1]} exceeds the model's maximum {width}")
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _params_to_buffers(module: nn.Module) -> None:
    """Turn every parameter under ``module`` into a persistent buffer (kept in the state dict)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach())


class FlowLoss(NamedTuple):
    """Result of :meth:`SmolVLAModel.flow_loss`.

    ``loss``: scalar training loss (masked mean); ``per_sample``: (B,) masked means; ``losses``:
    (B, H, max_action_dim) element-wise ``(u_t - v_t)^2`` without any masking; ``v_t``, ``u_t``,
    ``x_t``: the predicted velocity, the target and the network input, all (B, H, max_action_dim).
    """

    loss: Tensor
    per_sample: Tensor
    losses: Tensor
    v_t: Tensor
    u_t: Tensor
    x_t: Tensor


class SmolVLAModel(nn.Module):
    """The SmolVLA network: prefix/suffix embedding, interleaved VLM + action-expert layers, flow head.

    Inputs of the compute methods (all batch-first):
        images: list (one per camera) of (B, 3, H, W) in [-1, 1] (see :meth:`prepare_images`).
        img_masks: list of (B,) bool, False marks a missing camera.
        tokens / token_mask: (B, T) int64 ids and bool validity (right-padded).
        state: (B, S) normalized state, S <= max_state_dim (zero-padded here).

    Tensors that cannot influence the action output (the VLM's final norm, and in the last VLM
    layer the query/output projections, post-attention norm and MLP: only its keys and values
    reach the expert) are buffers, not parameters: the state dict still round-trips with
    LeRobot's file, while ``parameters()`` holds only tensors that receive gradients.
    """

    def __init__(self, arch: SmolVLAArch):
        super().__init__()
        self.arch = arch
        vlm = copy.deepcopy(arch.vlm_config)
        vlm.vision_config._attn_implementation = arch.vision_attn_implementation
        text = vlm.text_config
        a = arch
        self.vision = SmolVLMVisionTransformer(vlm.vision_config)
        self.connector = SmolVLMConnector(vlm)
        self.embed_tokens = nn.Embedding(text.vocab_size, a.hidden, padding_idx=text.pad_token_id)
        self.vlm_layers = nn.ModuleList(
            Block(text, a.heads, a.kv_heads, a.head_dim) for _ in range(a.n_layers)
        )
        self.vlm_norm = LlamaRMSNorm(a.hidden, eps=text.rms_norm_eps)

        expert = copy.deepcopy(text)
        expert.hidden_size = a.expert_hidden
        expert.intermediate_size = expert_ffn_width(a.expert_hidden)
        self.expert_config = expert
        vlm_kv = a.kv_heads * a.head_dim
        self.expert_layers = nn.ModuleList(
            Block(expert, a.heads, a.kv_heads, a.head_dim, kv_in=None if a.is_self_attn_layer(i) else vlm_kv)
            for i in range(a.n_layers)
        )
        self.expert_norm = LlamaRMSNorm(a.expert_hidden, eps=text.rms_norm_eps)

        e = a.expert_hidden
        self.state_proj = nn.Linear(a.max_state_dim, a.hidden)
        self.action_in_proj = nn.Linear(a.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, a.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e, e)
        self.action_time_mlp_out = nn.Linear(e, e)

        self.gradient_checkpointing = False  # recompute each layer pair in backward (training only)
        last = self.vlm_layers[-1]
        for dead in (last.self_attn.q_proj, last.self_attn.o_proj, last.post_attention_layernorm, last.mlp):
            _params_to_buffers(dead)
        _params_to_buffers(self.vlm_norm)

    # ------------------------------------------------------------------ inputs
    def prepare_images(
        self, images: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None, n_empty: int = 0
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Camera images in [0, 1] -> vision-tower inputs in [-1, 1] and (B,) bool masks.

        Each image is (B, 3, H, W) (or (B, T, 3, H, W): the last frame is used), resized with
        padding to ``arch.resize_hw`` when its size differs. ``n_empty`` (at most
        ``arch.empty_cameras``) all -1 images with False masks are appended for missing cameras.
        """
        if not images:
            raise ValueError("at least one camera image is required")
        out, out_masks = [], []
        for k, img in enumerate(images):
            img = img[:, -1] if img.dim() == 5 else img
            if self.arch.resize_hw is not None:
                img = resize_with_pad(img, *self.arch.resize_hw, pad_value=0.0)
            img = img * 2.0 - 1.0
            m = None if masks is None else masks[k]
            m = torch.ones(img.shape[0], dtype=torch.bool, device=img.device) if m is None else m.bool()
            out.append(img)
            out_masks.append(m)
        for _ in range(min(n_empty, self.arch.empty_cameras)):
            out.append(torch.full_like(out[-1], -1.0))
            out_masks.append(torch.zeros_like(out_masks[-1]))
        return out, out_masks

    # ------------------------------------------------------------------ embeddings
    def embed_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, N, d) connector tokens (not yet scaled)."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        feats = self.vision(pixel_values=pixels.to(dtype)).last_hidden_state
        return self.connector(feats)

    def embed_prefix(
        self,
        images: Sequence[Tensor],
        img_masks: Sequence[Tensor],
        tokens: Tensor,
        token_mask: Tensor,
        state: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Prefix tokens ``[camera_0 | camera_1 | ... | language | state]``.

        Returns ``(embs (B, P, d), pad (B, P) bool, flags (B, P) bool)``; ``flags`` is True only at
        the state token (images and language form one bidirectional block).
        """
        parts, pads, flags = [], [], []
        for img, m in zip(images, img_masks):
            emb = self.embed_image(img)
            emb = emb * torch.tensor(emb.shape[-1] ** 0.5, dtype=emb.dtype, device=emb.device)
            parts.append(emb)
            pads.append(m[:, None].expand(emb.shape[0], emb.shape[1]))
            flags.append(torch.zeros(emb.shape[1], dtype=torch.bool))
        lang = self.embed_tokens(tokens)
        parts.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(token_mask.bool())
        flags.append(torch.zeros(lang.shape[1], dtype=torch.bool))

        state = pad_last_dim(state, self.arch.max_state_dim)
        state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))
        state_emb = state_emb[:, None, :] if state_emb.dim() == 2 else state_emb
        parts.append(state_emb)
        pads.append(torch.ones(state_emb.shape[:2], dtype=torch.bool, device=state_emb.device))
        flags.append(torch.ones(state_emb.shape[1], dtype=torch.bool))

        embs = torch.cat(parts, dim=1)
        pad = torch.cat(pads, dim=1)
        flag = torch.cat(flags).to(pad.device)[None, :].expand(pad.shape[0], -1)
        extra = self.arch.prefix_length - embs.shape[1]
        if extra > 0:
            embs = F.pad(embs, (0, 0, 0, extra))
            pad = F.pad(pad, (0, extra), value=False)
            flag = F.pad(flag, (0, extra), value=False)
        return embs, pad, flag

    def embed_suffix(self, x_t: Tensor, time: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Action tokens from noisy actions (B, H, max_action_dim) and times (B,).

        ``mlp_out(silu(mlp_in([action_in_proj(x_t) | time_embedding(t)])))``. Returns
        ``(embs (B, H, e), pad (B, H) bool, flags (B, H) bool)``; every action token opens a
        block, so the chunk is causal.
        """
        act = self.action_in_proj(x_t.to(self.action_in_proj.weight.dtype))
        temb = time_embedding(time, self.arch.expert_hidden, self.arch.min_period, self.arch.max_period)
        temb = temb.to(act.dtype)[:, None, :].expand_as(act)
        h = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([act, temb], dim=2))))
        shape = h.shape[:2]
        ones = torch.ones(shape, dtype=torch.bool, device=h.device)
        return h, ones, ones.clone()

    # ------------------------------------------------------------------ attention
    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Masked multi-head attention with grouped kv heads.

        q (B, Lq, H, D), k/v (B, Lk, KV, D), mask (B, Lq, Lk) bool -> (B, Lq, H*D). Scores and
        softmax in float32; masked scores are float32's lowest value (a fully masked row gives a
        uniform average, never NaN).
        """
        b, lq, h, d = q.shape
        groups = h // k.shape[2]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        scores = torch.matmul(q.to(torch.float32).transpose(1, 2), k.to(torch.float32).permute(0, 2, 3, 1))
        scores = (scores * self.arch.head_dim**-0.5).to(torch.float32)
        scores = torch.where(mask[:, None], scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, lq, h * d)

    def _rot(self, x: Tensor, pos: Tensor) -> Tensor:
        return rope(x, pos, self.arch.rope_max_wavelength)

    # ------------------------------------------------------------------ layer stacks
    def forward_joint(self, prefix: Tensor, suffix: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Both streams through every layer (training path).

        ``mask`` (B, P+S, P+S) and ``positions`` (B, P+S) cover ``[prefix; suffix]``. Returns the
        expert's final-normed hidden states (B, S, e).
        """
        for i in range(len(self.vlm_layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                prefix, suffix = checkpoint(
                    self._joint_layer, i, prefix, suffix, mask, positions, use_reentrant=False
                )
            else:
                prefix, suffix = self._joint_layer(i, prefix, suffix, mask, positions)
        return self.expert_norm(suffix)

    def _joint_layer(
        self, i: int, prefix: Tensor, suffix: Tensor, mask: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Layer ``i`` of both streams (see :meth:`forward_joint`)."""
        vl, el = self.vlm_layers[i], self.expert_layers[i]
        p = prefix.shape[1]
        last = i == len(self.vlm_layers) - 1  # the prefix output of the last layer is never read
        qp, kp, vp = vl.qkv(prefix)
        if self.arch.is_self_attn_layer(i):
            qs, ks, vs = el.qkv(suffix)
            q = self._rot(torch.cat([qp, qs], dim=1), positions)
            k = self._rot(torch.cat([kp, ks], dim=1), positions)
            att = self.attend(q, k, torch.cat([vp, vs], dim=1), mask)
            att_p, att_s = att[:, :p], att[:, p:]
        else:
            pos_p, pos_s = positions[:, :p], positions[:, p:]
            kp = self._rot(kp, pos_p)
            att_p = None if last else self.attend(self._rot(qp, pos_p), kp, vp, mask[:, :p, :p])
            att_s = self._cross(el, suffix, kp, vp, pos_s, mask[:, p:, :p])
        suffix = el.finish(suffix, att_s)
        if not last:
            prefix = vl.finish(prefix, att_p)
        return prefix, suffix

    def depths(self) -> dict[str, tuple[str, int, int]]:
        """Parameter name -> (module, depth from the input, depths in that module), for the
        optimizer's layer-wise LR decay and per-module LRs (``vla_ft.models.params``).

        vision: patch/position embedding, encoder layers, post-norm; projector: the connector and
        the state projection; language: token embedding then the VLM layers; heads: the action
        expert's layers, its norm and the action/time projections (depth 0: they sit at the top).
        """
        nv = len(self.vision.encoder.layers)
        nl = len(self.vlm_layers)
        out: dict[str, tuple[str, int, int]] = {}
        for name, _ in self.named_parameters():
            part = name.split(".")
            if part[0] == "vision":
                if part[1] == "encoder":
                    out[name] = ("vision", int(part[3]) + 1, nv + 2)
                else:
                    out[name] = ("vision", 0 if part[1] == "embeddings" else nv + 1, nv + 2)
            elif part[0] in ("connector", "state_proj"):
                out[name] = ("projector", 0, 1)
            elif part[0] == "embed_tokens":
                out[name] = ("language", 0, nl + 1)
            elif part[0] == "vlm_layers":
                out[name] = ("language", int(part[1]) + 1, nl + 1)
            else:  # expert_layers.*, expert_norm, action_in/out_proj, action_time_mlp_*
                out[name] = ("heads", 0, 1)
        return out

    def _cross(
        self, el: Block, suffix: Tensor, vlm_k: Tensor, vlm_v: Tensor, pos: Tensor, mask: Tensor
    ) -> Tensor:
        """Expert queries over the VLM's (rotated) keys and values, re-projected by the expert.

        The expert's query positions are re-based to start at 0.
        """
        q, k, v = el.cross_qkv(suffix, vlm_k, vlm_v)
        pos = pos - pos.min(dim=1, keepdim=True).values
        return self.attend(self._rot(q, pos), k, v, mask)

    def encode_prefix(self, prefix: Tensor, pad: Tensor, flags: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run the prefix alone through the VLM layers; returns per layer its (rotated keys, values).

        Every layer attends within the prefix here (cross-attention layers included). The
        returned cache is read by :meth:`forward_cached`.
        """
        mask = block_attention_mask(pad, flags)
        pos = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        cache = []
        for i, vl in enumerate(self.vlm_layers):
            q, k, v = vl.qkv(prefix)
            k = self._rot(k, pos)
            cache.append((k, v))
            if i + 1 < len(self.vlm_layers):  # the last layer's output is never read
                prefix = vl.finish(prefix, self.attend(self._rot(q, pos), k, v, mask))
        return cache

    def forward_cached(
        self, suffix: Tensor, cache: list[tuple[Tensor, Tensor]], prefix_pad: Tensor
    ) -> Tensor:
        """Expert stream only, against the cached prefix (inference path). Returns (B, S, e).

        Suffix positions continue after the valid prefix tokens; the suffix sees every valid
        prefix token and the chunk causally.
        """
        b, s = suffix.shape[:2]
        ones = torch.ones(b, s, dtype=torch.bool, device=suffix.device)
        mask = torch.cat(
            [prefix_pad[:, None, :].expand(b, s, prefix_pad.shape[1]), block_attention_mask(ones, ones)],
            dim=2,
        )
        pos = prefix_pad.sum(dim=-1, keepdim=True) + torch.cumsum(ones.to(torch.int64), dim=1) - 1
        p = prefix_pad.shape[1]
        for i, el in enumerate(self.expert_layers):
            ck, cv = cache[i]
            if self.arch.is_self_attn_layer(i):
                q, k, v = el.qkv(suffix)
                k = torch.cat([ck, self._rot(k, pos)], dim=1)
                att = self.attend(self._rot(q, pos), k, torch.cat([cv, v], dim=1), mask)
            else:
                att = self._cross(el, suffix, ck, cv, pos, mask[:, :, :p])
            suffix = el.finish(suffix, att)
        return self.expert_norm(suffix)

    def _velocity_head(self, hidden: Tensor) -> Tensor:
        hidden = hidden[:, -self.arch.chunk_size :]
        return self.action_out_proj(hidden.to(self.action_out_proj.weight.dtype))

    # ------------------------------------------------------------------ flow matching
    def velocity(
        self,
        images: Sequence[Tensor],
        img_masks: Sequence[Tensor],
        tokens: Tensor,
        token_mask: Tensor,
        state: Tensor,
        x_t: Tensor,
        time: Tensor,
    ) -> Tensor:
        """One joint pass: predicted velocity v(x_t, t), (B, chunk, max_action_dim)."""
        prefix, p_pad, p_flag = self.embed_prefix(images, img_masks, tokens, token_mask, state)
        suffix, s_pad, s_flag = self.embed_suffix(x_t, time)
        pad = torch.cat([p_pad, s_pad], dim=1)
        mask = block_attention_mask(pad, torch.cat([p_flag, s_flag], dim=1))
        positions = torch.cumsum(pad.to(torch.int64), dim=1) - 1
        return self._velocity_head(self.forward_joint(prefix, suffix, mask, positions))

    def flow_loss(
        self,
        images: Sequence[Tensor],
        img_masks: Sequence[Tensor],
        tokens: Tensor,
        token_mask: Tensor,
        state: Tensor,
        actions: Tensor,
        noise: Tensor | None = None,
        time: Tensor | None = None,
        action_is_pad: Tensor | None = None,
        action_dim: int | None = None,
    ) -> FlowLoss:
        """Flow-matching training loss.

        Args:
            actions: (B, chunk, A) normalized targets; zero-padded to ``max_action_dim`` here.
            noise: (B, chunk, max_action_dim) sample at t = 1 (default: standard normal).
            time: (B,) flow times (default: Beta(1.5, 1) * 0.999 + 0.001).
            action_is_pad: (B, chunk) True where the chunk ran past the episode end: not counted.
            action_dim: dimensions that count in the loss (default: ``actions.shape[-1]``
                before padding; padded dimensions never count).
        """
        action_dim = action_dim or actions.shape[-1]
        actions = pad_last_dim(actions, self.arch.max_action_dim)
        if noise is None:
            noise = sample_noise(actions.shape, actions.device).to(actions.dtype)
        if time is None:
            time = sample_time(actions.shape[0], actions.device)
        x_t, u_t = noisy_actions(actions, noise, time)
        v_t = self.velocity(images, img_masks, tokens, token_mask, state, x_t, time)
        losses = F.mse_loss(u_t, v_t.to(u_t.dtype), reduction="none")
        loss, per_sample = masked_flow_loss(losses, action_is_pad, action_dim)
        return FlowLoss(loss, per_sample, losses, v_t, u_t, x_t)

    forward = flow_loss

    def sample_actions(
        self,
        images: Sequence[Tensor],
        img_masks: Sequence[Tensor],
        tokens: Tensor,
        token_mask: Tensor,
        state: Tensor,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        return_velocities: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Euler-integrate from noise (t = 1) to actions (t = 0) with the prefix K/V computed once.

        Returns the normalized chunk (B, chunk, max_action_dim), padded dimensions included
        (slice ``[..., :action_dim]``); with ``return_velocities`` also the (num_steps, B, chunk,
        max_action_dim) velocity of every step. Gradients are not disabled here.
        """
        prefix, pad, flags = self.embed_prefix(images, img_masks, tokens, token_mask, state)
        cache = self.encode_prefix(prefix, pad, flags)
        if noise is None:
            shape = (prefix.shape[0], self.arch.chunk_size, self.arch.max_action_dim)
            noise = sample_noise(shape, prefix.device)
        seen: list[Tensor] = []

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            suffix, _, _ = self.embed_suffix(x, t)
            return self._velocity_head(self.forward_cached(suffix, cache, pad))

        x = euler_integrate(
            velocity, noise, num_steps or self.arch.num_steps, on_step=(lambda k, t, v: seen.append(v))
        )
        return (x, torch.stack(seen)) if return_velocities else x
