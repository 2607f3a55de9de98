"""VLAPolicy: backbone tokens -> action chunk + task outputs; inference with a chunk queue.

Token sequence fed to the language model (one pass, all action-chunk steps decoded in parallel):

    [image tokens (T*K*P)] [state (1)] [instruction (L)] [action queries (H)] [readout (1)]

With a causal LM every query sees the images, the state and the instruction; the readout token
(last) sees everything and feeds the task head.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from vla_ft.config import ModelConfig
from vla_ft.constants import (
    ACTION,
    IMAGES,
    INSTR_IDS,
    INSTR_MASK,
    OUT_ACTION,
    OUT_HEATMAP,
    OUT_HIDDEN,
    OUT_PROGRESS,
    OUT_TASK_LOGITS,
    OUT_WAYPOINT,
    STATE,
)
from vla_ft.data.layout import history_indices
from vla_ft.models.backbone import Backbone
from vla_ft.models.heads import ACTION_HEADS, TaskHead

# The checkpoint writer and reader behind VLAPolicy.save_pretrained / from_pretrained, installed by
# vla_ft/models/loading.py (see register_checkpoint_io).
_CHECKPOINT_IO: dict[str, Callable[..., Any]] = {}


def register_checkpoint_io(save: Callable[..., Any], load: Callable[..., Any]) -> None:
    """Install the checkpoint writer and reader behind :meth:`VLAPolicy.save_pretrained` and
    :meth:`VLAPolicy.from_pretrained`.

    vla_ft/models/loading.py installs its own when imported, and importing any module of
    vla_ft.models imports it first (the package's ``__init__``). This module cannot import loading:
    loading builds every kind of policy, each a subclass of :class:`VLAPolicy`.
    """
    _CHECKPOINT_IO.update(save=save, load=load)


@runtime_checkable
class HeatmapSource(Protocol):
    """A policy that shows where its keypoint heat maps look (``VLAPolicy`` and its subclasses; the
    probe, vla_ft/tools/probe.py, scores them when ``heatmap_count > 0``)."""

    heatmap_count: int

    def heatmaps(self, obs: dict[str, np.ndarray], instructions: list[str]) -> np.ndarray:
        """float32 (N, K cameras, Q keypoints, h, w) softmax maps of a batched observation."""
        ...


@dataclass
class ModelDims:
    """Shapes that come from the data (a ``DatasetInfo`` provides them)."""

    action_dim: int
    state_dim: int
    image_keys: list[str]
    state_keys: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (64, 64)
    history: int = 1
    chunk: int = 4
    task_names: list[str] = field(default_factory=lambda: ["task"])
    # task name -> the distinct instructions its training demos carry; evaluation feeds one of them
    # when an env gives no instruction (vla_ft/eval/env_match.py). Empty in older checkpoints.
    instructions: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: Any) -> ModelDims:
        return cls(
            action_dim=int(info.action_dim),
            state_dim=int(info.state_dim),
            image_keys=list(info.image_keys),
            state_keys=list(getattr(info, "state_keys", [])),
            image_size=(int(info.image_size[0]), int(info.image_size[1])),
            history=int(info.history),
            chunk=int(info.chunk),
            task_names=list(info.task_names) or ["task"],
            instructions={t: list(v) for t, v in (getattr(info, "task_instructions", None) or {}).items()},
        )

    @property
    def num_tasks(self) -> int:
        return max(1, len(self.task_names))


class VLAPolicy(nn.Module):
    """A vision-language-action policy.

    Its capabilities are declared, not probed: :attr:`heatmap_count`, :attr:`task_outputs` (what
    the task terms of the loss can read, vla_ft/task_terms.py) and :meth:`lora_problem`; subclasses
    (bc-cnn, SmolVLA) override them.

    Args:
        cfg: the model config (head type, bins, inference options).
        dims: data shapes.
        backbone: a :class:`~vla_ft.models.backbone.Backbone` (NativeBackbone or VLMBackbone).
        tokenizer: the instruction tokenizer (``policy.tokenizer``).
        arch: resolved architecture description (saved in config.json to rebuild the model).
    """

    def __init__(
        self, cfg: ModelConfig, dims: ModelDims, backbone: nn.Module, tokenizer: Any, arch: dict
    ) -> None:
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"{type(backbone).__name__} does not implement vla_ft.models.backbone.Backbone")
        self.cfg, self.dims, self.tokenizer, self.arch = cfg, dims, tokenizer, arch
        self.normalizer: Any = None
        self.backbone = backbone
        d = backbone.hidden_size
        n_views = dims.history * len(dims.image_keys)
        self.view_embed = nn.Parameter(torch.randn(n_views, d) * 0.02)  # per (frame, camera)
        s = dims.history * dims.state_dim
        self.state_proj = nn.Linear(s, d) if s > 0 else None
        # FiLM backbones: the proprio state joins the instruction in the conditioning vector, so the
        # CNN can look for "the red cube" while the gripper is open and "the blue bowl" once it holds
        # the cube (a text-only FiLM must extract both at once; docs/models.md). Zero-init: a
        # checkpoint without it behaves as before.
        self.state_film = nn.Linear(s, d) if s > 0 and backbone.conditions_vision else None
        if self.state_film is not None:
            nn.init.zeros_(self.state_film.weight)
            nn.init.zeros_(self.state_film.bias)
        self.action_queries = nn.Parameter(torch.randn(dims.chunk, d) * 0.02)
        self.readout = nn.Parameter(torch.randn(1, d) * 0.02)
        self.dropout = nn.Dropout(cfg.dropout)
        self.action_head = ACTION_HEADS[cfg.action_head](
            d, dims.action_dim, n_bins=cfg.n_bins, bin_range=cfg.bin_range, decode=cfg.bin_decode
        )
        self.task_head = TaskHead(d, dims.num_tasks)
        self.reset()

    # ------------------------------------------------------------------ capabilities
    @property
    def heatmap_count(self) -> int:
        """Keypoint heat maps per camera image that ``forward`` returns as OUT_HEATMAP (0: none)."""
        return self.backbone.heatmap_count

    @property
    def task_outputs(self) -> frozenset[str]:
        """The task outputs ``forward`` returns: the task head's, and the heat maps when it has them."""
        heat = (OUT_HEATMAP,) if self.heatmap_count else ()
        return frozenset((OUT_TASK_LOGITS, OUT_PROGRESS, OUT_WAYPOINT, *heat))

    def lora_problem(self, r: int) -> str | None:
        """Why LoRA adapters of rank ``r`` (``model.lora.r``) cannot go on this policy; None: they can
        (vla_ft/models/lora.py)."""
        del r
        return None

    # ------------------------------------------------------------------ training forward
    @property
    def action_bins(self) -> nn.Module | None:
        """The binned head (``to_bins`` / ``from_bins`` / ``centers``) or None for continuous."""
        return self.action_head if self.cfg.action_head == "binned" else None

    def _sequence(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """(input embeddings (B, N, D), attention mask (B, N), heat maps (B, K, P, h, w) or None,
        (start, end) positions of the instruction tokens in the sequence)."""
        images = batch[IMAGES]  # (B, T, K, 3, H, W) uint8
        b, t, k = images.shape[:3]
        x = images.reshape(b * t * k, *images.shape[3:]).float() / 255.0
        ids, mask = batch[INSTR_IDS], batch[INSTR_MASK]
        if not ids.is_cuda:  # right-padded: drop columns of padding only (a host sync: CPU only)
            n = max(1, int(mask.sum(1).max()))
            ids, mask = ids[:, :n], mask[:, :n]
        if self.backbone.conditions_vision:  # FiLM: the instruction steers the CNN
            cond = self.backbone.encode_text(ids, mask)  # (B, D)
            if self.state_film is not None:
                cond = cond + self.state_film(batch[STATE].reshape(b, -1).to(cond.dtype))
            cond = cond.repeat_interleave(t * k, dim=0)  # (B*T*K, D)
        else:
            cond = None
        heat = None
        if self.heatmap_count:
            img, heat = self.backbone.encode_images(x, cond, heatmaps=True)  # (B*T*K, P, D), (B*T*K, Q, h, w)
            heat = heat.reshape(b, t, k, *heat.shape[1:])[:, -1]  # (B, K, Q, h, w): the current frame
        else:
            img = self.backbone.encode_images(x) if cond is None else self.backbone.encode_images(x, cond)
        img = img.reshape(b, t * k, img.shape[1], -1) + self.view_embed[:, None].to(img.dtype)
        img = img.reshape(b, -1, img.shape[-1])  # (B, T*K*P, D)
        parts = [img]
        if self.state_proj is not None:
            parts.append(self.state_proj(batch[STATE].reshape(b, -1).to(img.dtype))[:, None])  # (B, 1, D)
        parts.append(self.backbone.embed_tokens(ids))  # (B, L, D)
        parts.append(self.action_queries[None].expand(b, -1, -1).to(img.dtype))  # (B, H, D)
        parts.append(self.readout[None].expand(b, -1, -1).to(img.dtype))  # (B, 1, D)
        seq = self.dropout(torch.cat(parts, dim=1))  # (B, N, D)
        ones = mask.new_ones
        n_pre = seq.shape[1] - ids.shape[1] - self.dims.chunk - 1
        attn = torch.cat([ones(b, n_pre), mask, ones(b, self.dims.chunk + 1)], dim=1)  # (B, N)
        return seq, attn, heat, (n_pre, n_pre + ids.shape[1])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predict the normalized action chunk and task outputs; the batch is not modified.

        Args:
            batch: IMAGES uint8 (B, T, K, 3, H, W), STATE (B, T, S), INSTR_IDS/INSTR_MASK (B, L).

        Returns:
            OUT_ACTION (B, H, A) [+ OUT_ACTION_LOGITS (B, H, A, NB)], OUT_TASK_LOGITS (B, NT),
            OUT_PROGRESS (B,), OUT_WAYPOINT (B, 3), OUT_HIDDEN (B, N, D) [+ OUT_HEATMAP (B, K, Q, h, w)
            with a keypoint backbone].
        """
        seq, attn, heat, instruction = self._sequence(batch)
        if getattr(self.backbone, "trunk_window", 0):  # native backbones: the instruction in windows
            hidden = self.backbone(seq, attn, instruction=instruction)  # (B, N, D)
        else:
            hidden = self.backbone(seq, attn)
        h = self.dims.chunk
        queries = hidden[:, -h - 1 : -1].float()
        if self.cfg.action_head == "flow":  # trains on the target chunk when the batch has one
            out = dict(self.action_head(queries, batch.get(ACTION), self.cfg.flow_steps))
        else:
            out = dict(self.action_head(queries))
        out.update(self.task_head(hidden[:, -1].float()))
        out[OUT_HIDDEN] = hidden
        if heat is not None:
            out[OUT_HEATMAP] = heat
        return out

    def set_gradient_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing in the vision and language backbones."""
        self.backbone.set_gradient_checkpointing(enable)

    def save_pretrained(self, out_dir: Any, manifest: bool = True) -> Any:
        """Write config.json, model.safetensors, normalization.json and tokenizer files (and
        ``manifest.json`` with their sha256 unless ``manifest=False``)."""
        return _CHECKPOINT_IO["save"](self, out_dir, manifest=manifest)

    @classmethod
    def from_pretrained(cls, path: Any, cfg: ModelConfig | None = None, info: Any = None) -> VLAPolicy:
        """Load a checkpoint directory written by :meth:`save_pretrained`."""
        return _CHECKPOINT_IO["load"](path, cfg, info)

    def set_normalizer(self, normalizer: Any) -> None:
        """Install action/state normalization stats (used by predict_action and saved with the model)."""
        self.normalizer = normalizer

    # ------------------------------------------------------------------ inference
    @property
    def action_dim(self) -> int:
        return self.dims.action_dim

    @property
    def bin_range(self) -> tuple[float, float]:
        """(low, high) of the action bins in normalized units (binned head; losses discretize with it)."""
        return (-self.cfg.bin_range, self.cfg.bin_range)

    @property
    def obs_spec(self) -> Any:
        """The ObsSpec (keys, image size, history) ``predict_action`` feeds ``obs_to_inputs``."""
        from vla_ft.data.transforms import ObsSpec

        d = self.dims
        return ObsSpec(tuple(d.image_keys), tuple(d.state_keys), tuple(d.image_size), d.history)

    def _inputs(self, obs: dict[str, np.ndarray], instructions: list[str]) -> dict[str, torch.Tensor]:
        from vla_ft.data.transforms import obs_to_inputs

        inputs = obs_to_inputs(obs, self.obs_spec, self.normalizer, batched=True)
        for key in (IMAGES, STATE):  # too few frames: repeat the oldest (as at an episode start)
            x = inputs[key]
            if x.shape[1] < self.dims.history:
                frames = history_indices(x.shape[1] - 1, self.dims.history)
                inputs[key] = x[:, torch.from_numpy(frames)]
        tok = self.tokenizer(instructions, padding="longest", return_tensors="pt")
        inputs[INSTR_IDS] = tok["input_ids"].long()
        inputs[INSTR_MASK] = tok["attention_mask"].long()
        device = next(self.parameters()).device
        return {k: v.to(device) for k, v in inputs.items()}

    def predict_action(self, obs: dict[str, np.ndarray], instruction: str | list[str]) -> np.ndarray:
        """Action chunk(s) in env units, clipped to [action_low, action_high].

        Args:
            obs: env observation; batched (leading N) when ``instruction`` is a list of N strings.
            instruction: one string (single obs) or a list of N strings.

        Returns:
            float32 (H, A) for a single observation, (N, H, A) for a batch.
        """
        single = isinstance(instruction, str)
        if single:
            obs = {k: np.asarray(v)[None] for k, v in obs.items()}
            instruction = [instruction]
        norm = self._infer(obs, list(instruction), OUT_ACTION).cpu().numpy()  # (N, H, A)
        act = self.normalizer.unnormalize_action(norm) if self.normalizer is not None else norm
        act = np.clip(np.asarray(act, dtype=np.float32), self.cfg.action_low, self.cfg.action_high)
        return act[0] if single else act

    def heatmaps(self, obs: dict[str, np.ndarray], instructions: list[str]) -> np.ndarray:
        """Where the keypoint heat maps look: their softmax over the current frame's cells.

        Map 0 of each camera is trained (``grounding`` loss) to peak on the named object, map 1 on
        the destination; ``vla_ft.tools.probe`` scores them against the demo files' labels.

        Args:
            obs: a batched observation (leading N, then T history frames), as for ``predict_action``.
            instructions: N strings.

        Returns:
            float32 (N, K cameras, Q keypoints, h, w), each map summing to 1.

        Raises:
            ValueError: the backbone has no keypoint heat maps (only native backbones with keypoints).
        """
        if not self.heatmap_count:
            raise ValueError(
                "this policy has no keypoint heat maps (a native backbone with model.extra.keypoints > 0 has)"
            )
        heat = self._infer(obs, list(instructions), OUT_HEATMAP)  # (N, K, Q, h, w) logits
        return heat.flatten(-2).softmax(-1).reshape(heat.shape).cpu().numpy()

    def _infer(self, obs: dict[str, np.ndarray], instructions: list[str], key: str) -> torch.Tensor:
        """One output of an eval-mode, no-grad forward on a batched observation (float32); the
        training mode is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return self(self._inputs(obs, instructions))[key].float()
        finally:
            self.train(was_training)

    def reset(self) -> None:
        """Clear the action queue / ensemble buffer and the frame history (call at episode start)."""
        self._queue: collections.deque = collections.deque()
        self._chunks: list[tuple[int, np.ndarray]] = []  # (step predicted, (N, H, A)) for ensembling
        self._frames: collections.deque = collections.deque(maxlen=self.dims.history)
        self._step = 0

    def _stacked_obs(self, obs: dict[str, np.ndarray], batched: bool) -> dict[str, np.ndarray]:
        """Keep the last ``history`` frames; stack them on a T axis (after N)."""
        frame = obs if batched else {k: np.asarray(v)[None] for k, v in obs.items()}
        self._frames.append(frame)
        keys = list(self.dims.image_keys) + list(self.dims.state_keys)
        return {k: np.stack([f[k] for f in self._frames], axis=1) for k in keys}

    def select_action(self, obs: dict[str, np.ndarray], instruction: str | list[str]) -> np.ndarray:
        """One action per call: executes ``n_action_steps`` of each chunk, or ensembles chunks.

        Args:
            obs: one env observation (or batched with leading N when ``instruction`` is a list).
            instruction: str, or list of N str.

        Returns:
            float32 (A,) (or (N, A) batched) in env units.
        """
        batched = not isinstance(instruction, str)
        instr = list(instruction) if batched else [instruction]
        stacked = self._stacked_obs(obs, batched)
        k = self.cfg.temporal_ensemble
        if k is not None:
            self._chunks.append((self._step, self.predict_action(stacked, instr)))
            self._chunks = [(s, c) for s, c in self._chunks if self._step - s < self.dims.chunk]
            acts = np.stack([c[:, self._step - s] for s, c in self._chunks])  # (M, N, A), oldest first
            w = np.exp(-k * np.arange(len(acts)))  # ACT: w_i = exp(-k * i), i = 0 the oldest
            action = (w[:, None, None] * acts).sum(0) / w.sum()
        else:
            if not self._queue:
                chunk = self.predict_action(stacked, instr)  # (N, H, A)
                steps = self.cfg.n_action_steps or self.dims.chunk
                self._queue.extend(chunk[:, i] for i in range(min(steps, self.dims.chunk)))
            action = self._queue.popleft()
        self._step += 1
        action = np.asarray(action, dtype=np.float32)
        return action if batched else action[0]
