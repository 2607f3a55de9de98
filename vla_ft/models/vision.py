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


class TimmVisionEncoder(nn.Module):
    """Images -> tokens with a timm backbone.

    CNN feature maps (N, C, h, w) are average-pooled to ``pool_grid x pool_grid`` tokens; ViT
    outputs (N, P, C) keep their patch tokens (prefix/class tokens dropped).

    Args:
        name: timm model name.
        kwargs: extra ``timm.create_model`` kwargs.
        pool_grid: token grid side for CNN feature maps.
        pretrained_path: local weights for the encoder, or None for random init.
        channels_last: use channels-last memory format for CNNs.
    """

    def __init__(
        self,
        name: str,
        kwargs: dict[str, Any] | None = None,
        pool_grid: int = 2,
        pretrained_path: str | None = None,
        channels_last: bool = True,
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            images: float (N, 3, H, W) in [0, 1].

        Returns:
            float (N, P, C) tokens.
        """
        x = (images - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(x)
        if feats.dim() == 4:  # (N, C, h, w) CNN map
            feats = F.adaptive_avg_pool2d(feats, self.pool_grid)
            return feats.flatten(2).transpose(1, 2)  # (N, g*g, C)
        if feats.dim() == 3:  # (N, P, C) transformer tokens
            return feats[:, self.num_prefix :]
        raise ValueError(f"timm model returned features of shape {tuple(feats.shape)}; expected 3 or 4 dims")

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


def _block_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 0
