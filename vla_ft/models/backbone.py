"""Native backbone: timm vision encoder -> MLP projector -> transformers language model.

Every backbone of a :class:`~vla_ft.models.policy.VLAPolicy` (this one and
:class:`vla_ft.models.vlm.VLMBackbone`) implements :class:`Backbone`: ``encode_images``,
``embed_tokens``, ``forward``, ``hidden_size``, ``depths``, ``set_gradient_checkpointing`` and two
declared capabilities. A backbone with ``conditions_vision = True`` (this one with ``film``) also
offers ``encode_text(ids, mask)``, and the policy passes its output to ``encode_images(images,
cond)`` (FiLM). A backbone with ``heatmap_count > 0`` (this one with keypoints) returns that many
keypoint heat maps per image from ``encode_images(images, cond, heatmaps=True)``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from vla_ft.constants import MODULE_LANGUAGE, MODULE_PROJECTOR, MODULE_VISION
from vla_ft.errors import ConfigError
from vla_ft.models.language import LanguageBackbone
from vla_ft.models.vision import TimmVisionEncoder

Depths = dict[str, tuple[str, int, int]]  # param name -> (module, depth, num_layers)


@runtime_checkable
class Backbone(Protocol):
    """What :class:`~vla_ft.models.policy.VLAPolicy` needs from its backbone.

    Attributes:
        hidden_size: width D of the tokens it embeds and returns.
        vocab_size: rows of its token embedding table.
        conditions_vision: ``encode_text`` exists and ``encode_images`` takes its output (FiLM).
        heatmap_count: keypoint heat maps per image ``encode_images(..., heatmaps=True)`` returns
            (0: none, and ``encode_images`` takes no ``heatmaps`` argument).
    """

    hidden_size: int
    vocab_size: int
    conditions_vision: bool
    heatmap_count: int

    def encode_images(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """float (N, 3, H, W) in [0, 1] -> (N, P, D) tokens (and heat maps when asked)."""
        ...

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) embeddings."""
        ...

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) input embeddings and (B, N) attention mask -> (B, N, D) hidden states."""
        ...

    def set_gradient_checkpointing(self, enable: bool) -> None:
        """Turn activation checkpointing on or off."""
        ...

    def depths(self) -> Depths:
        """Module, depth and layer count of every parameter (names relative to the backbone)."""
        ...


class NativeBackbone(nn.Module):
    """Vision tokens projected into the language model's width.

    Args:
        vision: timm model name.
        vision_kwargs: extra timm kwargs.
        pool_grid: CNN feature maps are pooled to this many tokens per side.
        language: transformers config dict (random init) or model dir / hub id.
        vision_pretrained: local timm weights, or None.
        channels_last: CNN memory format.
        trust_remote_code: transformers flag.
        keypoints: spatial-softmax keypoint token per image (0: none).
        film: condition the CNN stages on the instruction (FiLM from the language model's mean
            hidden state over the instruction tokens).
        keypoint_tokens: one token per keypoint (position + feature under it) instead of one in all.
        keypoint_window: local soft-argmax radius in cells around each heat map's peak (0: global).
        film_window: the FiLM conditioning reads the instruction with each token attending to itself
            and the ``film_window - 1`` tokens before it, in every layer (0: the whole instruction;
            see ``encode_text``).
        trunk_window: the same for the instruction tokens of the policy's sequence (``forward``
            with ``instruction``): each attends to the image and state tokens before it and to
            itself and the ``trunk_window - 1`` instruction tokens before it; the action queries
            still see everything.
    """

    def __init__(
        self,
        vision: str,
        vision_kwargs: dict[str, Any],
        pool_grid: int,
        language: str | dict[str, Any],
        vision_pretrained: str | None = None,
        channels_last: bool = True,
        trust_remote_code: bool = False,
        keypoints: int = 0,
        film: bool = False,
        keypoint_tokens: bool = False,
        keypoint_window: int = 0,
        film_window: int = 0,
        trunk_window: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("film_window", film_window), ("trunk_window", trunk_window)):
            if value < 0:
                raise ConfigError(f"model.extra.{name}={value}: must be >= 0 (0: the whole instruction)")
        if film_window and not film:
            raise ConfigError(
                f"model.extra.film_window={film_window} shapes the FiLM conditioning, and this model has no "
                "FiLM: set model.extra.film=true, or leave film_window unset"
            )
        self.film_window = int(film_window)
        self.trunk_window = int(trunk_window)
        self.language = LanguageBackbone(language, trust_remote_code)
        d = self.language.hidden_size
        self.vision = TimmVisionEncoder(
            vision,
            vision_kwargs,
            pool_grid,
            vision_pretrained,
            channels_last,
            keypoints,
            d if film else 0,
            keypoint_tokens,
            keypoint_window,
        )
        self.conditions_vision = film
        self.projector = nn.Sequential(nn.Linear(self.vision.out_dim, d), nn.GELU(), nn.Linear(d, d))
        self.hidden_size = d
        self.vocab_size = int(self.language.model.get_input_embeddings().num_embeddings)

    @property
    def heatmap_count(self) -> int:
        """Spatial-softmax keypoint heat maps per image of the vision encoder (0: no keypoints)."""
        return self.vision.heatmap_count

    def encode_images(
        self, images: torch.Tensor, cond: torch.Tensor | None = None, heatmaps: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """float (N, 3, H, W) in [0, 1] (+ (N, D) FiLM conditioning) -> (N, P, D) tokens.

        With ``heatmaps=True`` also the keypoint heat-map logits (N, K, h, w) (None without keypoints).
        """
        tokens, heat = self.vision(images, cond, heatmaps=True)
        tokens = self.projector(tokens)
        return (tokens, heat) if heatmaps else tokens

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Instruction alone through the language model -> (B, D) mean over its real tokens.

        With ``film_window`` each token attends only to the ``film_window`` tokens ending at it, in
        every layer, so the mean is a sum of local phrase codes: "the yellow cube" and "the red
        bowl" are encoded apart and added, and a word never seen in training adds a small term of
        its own instead of changing the code of the whole sentence. What that does to paraphrases
        and to held-out color pairs: docs/models.md.
        """
        hidden = self.language(self.embed_tokens(ids), mask, window=self.film_window)  # (B, L, D)
        weights = mask.to(hidden.dtype)[..., None]
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language.embed_tokens(ids)  # (B, L, D)

    def forward(
        self, embeds: torch.Tensor, mask: torch.Tensor, instruction: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """(B, N, D) sequence + (B, N) mask -> (B, N, D); ``instruction``: the (start, end) positions
        of the instruction tokens, read through ``trunk_window`` when it is set."""
        if self.trunk_window and instruction is not None:
            return self.language(embeds, mask, window=self.trunk_window, span=instruction)
        return self.language(embeds, mask)  # (B, N, D)

    def set_gradient_checkpointing(self, enable: bool) -> None:
        self.vision.set_gradient_checkpointing(enable)
        self.language.set_gradient_checkpointing(enable)

    def depths(self) -> Depths:
        """Module, depth and layer count of every parameter (names relative to this module)."""
        out: Depths = {}
        vdepth, vn = self.vision.layer_ids()
        for name, d in vdepth.items():
            out[f"vision.model.{name}"] = (MODULE_VISION, d, vn)
        ldepth, ln = self.language.layer_ids()
        for name, d in ldepth.items():
            out[f"language.model.{name}"] = (MODULE_LANGUAGE, d, ln)
        for name in self.vision.own_parameter_names():  # FiLM generators, keypoints: top of vision
            out[f"vision.{name}"] = (MODULE_VISION, vn - 1, vn)
        for name, _ in self.projector.named_parameters():
            out[f"projector.{name}"] = (MODULE_PROJECTOR, 0, 1)
        return out
