"""Vision encoder: any timm model by name, its features returned as tokens."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vla_ft.errors import CheckpointError, ConfigError


def create_timm(name: str, kwargs: dict[str, Any], pretrained_path: str | None) -> nn.Module:
    """Build a headless timm model; weights come only from a local file/dir (never downloaded).

    Raises:
        ConfigError: ``name`` is not a timm model (the message suggests the closest names).
        CheckpointError: ``pretrained_path`` does not exist.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model.vision={name!r} is not a timm model name.{hint} List them with timm.list_models()"
        )
    extra: dict[str, Any] = {}
    if pretrained_path is not None:
        path = Path(pretrained_path)
        if path.is_dir():
            files = (
                sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
            )
            if not files:
                raise CheckpointError(
                    f"model.vision_pretrained={pretrained_path!r}: no weight file in that dir"
                )
            path = files[0]
        if not path.is_file():
            raise CheckpointError(
                f"model.vision_pretrained={pretrained_path!r} does not exist; give a local timm weights file"
            )
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    return timm.create_model(name, num_classes=0, global_pool="", **kwargs, **extra)


def cell_centres(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(h*w, 2) image (x, y) of the cell centres of an h x w map, row-major: ``-1 + (2i + 1) / n``
    in [-1, 1], x right and y down (the convention of ``envs.rendering.project``)."""
    ys = torch.linspace(-1.0 + 1.0 / h, 1.0 - 1.0 / h, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0 + 1.0 / w, 1.0 - 1.0 / w, w, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)


class SpatialSoftmax(nn.Module):
    """Feature map -> K soft keypoints (expected x, y under a per-channel softmax) -> tokens.

    A 1x1 conv makes K heat maps; each is a softmax over the h*w cells (learned temperature) whose
    expected image coordinates in [-1, 1] are the keypoint. With ``per_keypoint=False`` the 2K
    coordinates are projected to one ``out_dim`` token; with ``per_keypoint=True`` each keypoint is
    its own token made of its (x, y) and the feature vector under its heat map (what is there, e.g.
    the color), so attention can pick "the red cube's keypoint" by content and read its position.

    With ``window > 0`` the keypoint is read locally: the softmax is restricted to the
    ``(2 * window + 1)^2`` cells around the heat map's peak (a local soft-argmax). The global
    expectation of a diffuse heat map is pulled toward the image centre and toward every other
    bright spot (another cube of the named color), most near the image edge. Presets keep 0; the
    window is unmeasured from the shipped base (docs/experiments/2026-11-tiny-vision-pathway.md).
    The heat-map logits returned (and supervised by the ``grounding`` loss) are the full map either
    way.
    """

    def __init__(
        self, channels: int, keypoints: int, out_dim: int, per_keypoint: bool = False, window: int = 0
    ) -> None:
        super().__init__()
        if window < 0:
            raise ConfigError(f"model.extra.keypoint_window={window}: must be >= 0 (0: global soft-argmax)")
        self.per_keypoint = per_keypoint
        self.window = int(window)
        self.heatmaps = nn.Conv2d(channels, keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.out = nn.Linear(2 + channels if per_keypoint else 2 * keypoints, out_dim)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, h, w) -> tokens (N, 1, out_dim) (or (N, K, out_dim) with ``per_keypoint``) and the
        heat-map logits (N, K, h, w) (temperature applied; their softmax is each keypoint's weights).

        Coordinates are cell centres in [-1, 1] (x right, y down), the convention of
        ``envs.rendering.project``, so a heat map can be supervised with a projected object position
        (the ``grounding`` loss term).
        """
        n, _, h, w = feats.shape
        logits = self.heatmaps(feats).flatten(2) / self.log_temperature.exp()  # (N, K, h*w)
        grid = cell_centres(h, w, feats.device, logits.dtype)  # (h*w, 2)
        read = logits if self.window == 0 else _around_peak(logits, h, w, self.window)
        attn = read.softmax(-1)  # (N, K, h*w)
        points = attn @ grid  # (N, K, 2)
        heat = logits.reshape(n, -1, h, w)
        if self.per_keypoint:
            what = attn @ feats.flatten(2).transpose(1, 2)  # (N, K, C): the feature under each heat map
            return self.out(torch.cat([points, what], dim=-1)), heat  # (N, K, out_dim)
        return self.out(points.reshape(n, -1))[:, None], heat


def _around_peak(logits: torch.Tensor, h: int, w: int, radius: int) -> torch.Tensor:
    """(N, K, h*w) logits with every cell farther than ``radius`` cells (either axis) from each map's
    argmax set to -inf, so their softmax is a local soft-argmax around the peak."""
    peak = logits.argmax(-1)  # (N, K)
    py, px = torch.div(peak, w, rounding_mode="floor"), peak % w
    ys = torch.arange(h, device=logits.device).repeat_interleave(w)  # (h*w,) row of each cell
    xs = torch.arange(w, device=logits.device).repeat(h)  # (h*w,) column of each cell
    near = ((ys - py[..., None]).abs() <= radius) & ((xs - px[..., None]).abs() <= radius)  # (N, K, h*w)
    return logits.masked_fill(~near, float("-inf"))


class TimmVisionEncoder(nn.Module):
    """Images -> tokens with a timm backbone, optionally conditioned on the instruction.

    CNN feature maps (N, C, h, w) are average-pooled to ``pool_grid x pool_grid`` tokens (plus one
    spatial-softmax keypoint token when ``keypoints > 0``); ViT outputs (N, P, C) keep their patch
    tokens (prefix/class tokens dropped).

    With ``film_dim > 0`` every CNN stage output is modulated by the instruction (FiLM,
    ``x * (1 + gamma) + beta`` per channel, gamma/beta linear in a ``film_dim`` text embedding and
    zero-initialized, so an untrained FiLM is the identity). The CNN then extracts what the
    instruction names ("the red cube") before pooling, instead of pooling every object together
    and leaving the language model to untangle them (docs/models.md).

    Args:
        name: timm model name.
        kwargs: extra ``timm.create_model`` kwargs.
        pool_grid: token grid side for CNN feature maps.
        pretrained_path: local weights for the encoder, or None for random init.
        channels_last: use channels-last memory format for CNNs.
        keypoints: spatial-softmax keypoints of the last feature map (0: none).
        film_dim: width of the conditioning vector for FiLM (0: no FiLM).
        keypoint_tokens: one token per keypoint (position + feature) instead of one for all.
        keypoint_window: read each keypoint from the cells within this many of its heat map's
            peak (0: the whole map; see ``SpatialSoftmax``).
    """

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any] | None = None,
        pool_grid: int = 2,
        pretrained_path: str | None = None,
        channels_last: bool = True,
        keypoints: int = 0,
        film_dim: int = 0,
        keypoint_tokens: bool = False,
        keypoint_window: int = 0,
    ) -> None:
        super().__init__()
        self.model = create_timm(name, dict(kwargs or {}), pretrained_path)
        cfg = self.model.pretrained_cfg
        self.register_buffer(
            "mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False
        )
        self.pool_grid = pool_grid
        self.out_dim = int(self.model.num_features)
        self.num_prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.keypoints = (
            SpatialSoftmax(self.out_dim, keypoints, self.out_dim, keypoint_tokens, keypoint_window)
            if keypoints > 0
            else None
        )
        self.heatmap_count = max(0, int(keypoints))  # keypoint heat maps per image
        self.film: nn.ModuleList | None = None
        self._film_stages: list[str] = []
        if film_dim > 0:
            stages = _film_stages(self.model, name)
            self._film_stages = [stage for stage, _ in stages]
            self.film = nn.ModuleList(nn.Linear(film_dim, 2 * c) for _, c in stages)
            for layer, (stage, _) in zip(self.film, stages, strict=True):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
                self.model.get_submodule(stage).register_forward_hook(_apply_film)

    def forward(
        self, images: torch.Tensor, cond: torch.Tensor | None = None, heatmaps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Encode images.

        Args:
            images: float (N, 3, H, W) in [0, 1].
            cond: float (N, film_dim) conditioning vectors; required when FiLM is on.
            heatmaps: also return the keypoint heat-map logits (N, K, h, w) (None without keypoints).

        Returns:
            float (N, P, C) tokens (and the heat maps when asked).
        """
        if self.film is not None:
            if cond is None:
                raise ValueError("this vision encoder is FiLM-conditioned: pass cond (N, film_dim)")
            for stage, layer in zip(self._film_stages, self.film, strict=True):
                # read by _apply_film; kept on the stage module itself so copies (EMA) use their own
                gamma, beta = layer(cond.to(images.dtype)).chunk(2, dim=-1)
                self.model.get_submodule(stage).vla_film = _FilmParams(gamma, beta)
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(x)
        heat = None
        if feats.dim() == 4:  # (N, C, h, w) CNN map
            tokens = F.adaptive_avg_pool2d(feats, self.pool_grid).flatten(2).transpose(1, 2)  # (N, g*g, C)
            if self.keypoints is not None:
                kp_tokens, heat = self.keypoints(feats)
                tokens = torch.cat([tokens, kp_tokens], dim=1)  # (N, g*g + 1 or K, C)
            return (tokens, heat) if heatmaps else tokens
        if feats.dim() == 3:  # (N, P, C) transformer tokens
            tokens = feats[:, self.num_prefix :]
            return (tokens, None) if heatmaps else tokens
        raise ValueError(f"timm model returned features of shape {tuple(feats.shape)}; expected 3 or 4 dims")

    def own_parameter_names(self) -> list[str]:
        """Parameters outside the timm model (FiLM generators, keypoint head)."""
        return [n for n, _ in self.named_parameters() if not n.startswith("model.")]

    def set_gradient_checkpointing(self, enable: bool) -> None:
        self.model.set_grad_checkpointing(enable)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Depth of each parameter (names relative to ``self.model``) from timm's group matcher.

        Returns:
            (name -> depth, number of depths); depth 0 is the stem, the last is the top.
        """
        names = [n for n, _ in self.model.named_parameters()]
        try:
            matcher = self.model.group_matcher(coarse=False)
        except (AttributeError, NotImplementedError):
            return {n: _block_index(n) for n in names}, max(_block_index(n) for n in names) + 1
        groups = timm.models.group_parameters(self.model, matcher)  # group id -> [names]
        ids = {n: int(gid) for gid, members in groups.items() for n in members}
        order = {gid: i for i, gid in enumerate(sorted(set(ids.values())))}
        depth = {n: order[ids[n]] if n in ids else len(order) for n in names}
        return depth, max(depth.values()) + 1


class _FilmParams:
    """gamma/beta of the last forward, kept on a hooked stage module.

    They are non-leaf tensors after a training forward, which ``copy.deepcopy`` refuses; a copy
    (EMA, LoRA merge, benchmarks) or a pickle of the model starts with an empty slot instead.
    """

    __slots__ = ("gamma", "beta")

    def __init__(self, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> None:
        self.gamma, self.beta = gamma, beta

    def __deepcopy__(self, memo: dict) -> _FilmParams:
        return _FilmParams()

    def __reduce__(self) -> tuple:
        return (_FilmParams, ())


def _apply_film(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a FiLM-conditioned CNN stage: ``out * (1 + gamma) + beta`` per channel.

    A plain function (no closure over the encoder), so a deep copy of the model (EMA) hooks its own
    stage modules. gamma/beta are set by ``TimmVisionEncoder.forward`` and not cleared: activation
    checkpointing re-runs the stage in backward with the same tensors.
    """
    film = module.vla_film
    return out * (1.0 + film.gamma[:, :, None, None]) + film.beta[:, :, None, None]


def _film_stages(model: nn.Module, name: str) -> list[tuple[str, int]]:
    """(module name, channels) of every CNN stage after the stem, from timm's ``feature_info``."""
    info = getattr(model, "feature_info", None)
    if not info or len(info) < 2:
        raise ConfigError(
            f"model.extra.film: timm model {name!r} has no CNN stage list (feature_info); "
            f"use FiLM with a CNN such as resnet18, or set model.extra.film=false"
        )
    entries = [info[i] for i in range(len(info))] if not isinstance(info, list) else info
    out = []
    for e in entries[1:]:
        stage = str(e["module"])
        module = model.get_submodule(stage)
        # Hook the stage's last block, not the stage: timm's gradient checkpointing (checkpoint_seq
        # with flatten=True) calls the blocks of a Sequential stage one by one and never the stage.
        if isinstance(module, nn.Sequential) and len(module) > 0:
            stage = f"{stage}.{len(module) - 1}"
        out.append((stage, int(e["num_chs"])))
    return out


def _block_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 0
