"""VLM backbone: a Hugging Face vision-language model as the joint vision + language backbone.

The VLM's own parts are used directly: its vision tower and connector turn each camera image into
tokens, its text embedding table embeds the instruction, and its language model runs over
``[image tokens, state, instruction, queries]`` as input embeddings. This avoids the processor's
image-placeholder tokens, so any image count and resolution works the same way for every family.

Supported families (attribute names of the base model, ``AutoModel``): Idefics3/SmolVLM, PaliGemma,
LLaVA. Trap: ``Idefics3Model.get_image_features`` silently drops all-zero images (it treats them
as padding), which is why the vision tower is called directly here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from vla_ft.constants import MODULE_LANGUAGE, MODULE_PROJECTOR, MODULE_VISION
from vla_ft.errors import ConfigError
from vla_ft.models.backbone import Depths
from vla_ft.models.language import load_hf_model, packed_positions, set_hf_checkpointing, transformer_depths

# model_type -> (vision tower, connector/projector, language model) attribute names
FAMILIES: dict[str, tuple[str, str, str]] = {
    "idefics3": ("vision_model", "connector", "text_model"),
    "smolvlm": ("vision_model", "connector", "text_model"),
    "paligemma": ("vision_tower", "multi_modal_projector", "language_model"),
    "llava": ("vision_tower", "multi_modal_projector", "language_model"),
}


def _image_stats(spec: str | dict[str, Any]) -> tuple[list[float], list[float]]:
    """Mean/std from the model dir's ``preprocessor_config.json``; SigLIP's 0.5/0.5 otherwise."""
    if isinstance(spec, str):
        path = Path(spec) / "preprocessor_config.json"
        if path.is_file():
            cfg = json.loads(path.read_text())
            return list(cfg.get("image_mean", [0.5] * 3)), list(cfg.get("image_std", [0.5] * 3))
    return [0.5] * 3, [0.5] * 3


class VLMBackbone(nn.Module):
    """An HF VLM's vision tower + connector + language model.

    Args:
        spec: config dict with ``model_type`` (random init) or a model dir / hub id.
        trust_remote_code: transformers flag (off unless the user turns it on).
        image_stats: (mean, std) per channel; default: the dir's preprocessor_config.json, else 0.5.
    """

    conditions_vision = False  # the instruction reaches the images only in the language model
    heatmap_count = 0  # no keypoint layer

    def __init__(
        self,
        spec: str | dict[str, Any],
        trust_remote_code: bool = False,
        image_stats: tuple[list[float], list[float]] | None = None,
    ) -> None:
        super().__init__()
        self.model = load_hf_model(AutoModel, spec, "model.vlm", trust_remote_code)
        cfg = self.model.config
        if cfg.model_type not in FAMILIES:
            raise ConfigError(
                f"model.vlm: model_type={cfg.model_type!r} is not a supported VLM family; "
                f"supported: {', '.join(FAMILIES)}"
            )
        self.vision_attr, self.proj_attr, self.lm_attr = FAMILIES[cfg.model_type]
        text_cfg = cfg.get_text_config()
        self.hidden_size = int(text_cfg.hidden_size)
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        self.num_text_blocks = int(text_cfg.num_hidden_layers)
        self.num_vision_blocks = int(cfg.vision_config.num_hidden_layers)
        self.image_size = int(cfg.vision_config.image_size)
        mean, std = image_stats if image_stats is not None else _image_stats(spec)
        self.image_stats = (list(mean), list(std))  # plain lists: saved in config.json (also on meta)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _part(self, attr: str) -> nn.Module:
        return getattr(self.model, attr)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """float (N, 3, H, W) in [0, 1] -> (N, P, D); resized to the tower's image size."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        x = ((images - self.mean) / self.std).to(self.model.dtype)
        hidden = self._part(self.vision_attr)(pixel_values=x).last_hidden_state  # (N, patches, Dv)
        return self._part(self.proj_attr)(hidden)  # (N, P, D)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)  # (B, L, D)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lm = self._part(self.lm_attr)
        out = lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=packed_positions(mask), use_cache=False
        )
        return out.last_hidden_state  # (B, N, D)

    def set_gradient_checkpointing(self, enable: bool) -> None:
        set_hf_checkpointing(self.model, enable)

    def depths(self) -> Depths:
        """Vision tower / connector / language model depth of every parameter (names under self)."""
        out: Depths = {}
        parts = (
            (self.vision_attr, MODULE_VISION, self.num_vision_blocks),
            (self.lm_attr, MODULE_LANGUAGE, self.num_text_blocks),
        )
        for attr, module, blocks in parts:
            depth, n = transformer_depths(self._part(attr), blocks)
            for name, d in depth.items():
                out[f"model.{attr}.{name}"] = (module, d, n)
        for name, _ in self._part(self.proj_attr).named_parameters():
            out[f"model.{self.proj_attr}.{name}"] = (MODULE_PROJECTOR, 0, 1)
        return out
