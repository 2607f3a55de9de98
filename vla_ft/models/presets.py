"""Model presets: named architectures built from config (random weights, no download).

A preset is ``native`` (a timm vision encoder + projector + a transformers language model built
from a config dict), ``vlm`` (a Hugging Face vision-language model built from its config class, used
as the joint vision+language backbone) or ``cnn`` (a plain CNN behaviour-cloning policy with no
transformer, the baseline; vla_ft/models/bc_cnn.py). ``ModelConfig`` fields override preset values.

The VLM presets hard-code the published config values of the SmolVLM family (Idefics3 class) so
that they can be built without network access, e.g. on the meta device for memory planning.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Literal

from vla_ft.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """One named architecture.

    Attributes:
        name: registry key.
        kind: ``native`` (timm + transformers LM), ``vlm`` (one HF vision-language model) or ``cnn``
            (:mod:`vla_ft.models.bc_cnn`: per-camera convs + MLP, no transformer).
        vision: timm model name (native only).
        vision_kwargs: extra ``timm.create_model`` kwargs (e.g. narrower channels).
        pool_grid: CNN feature maps are average-pooled to ``pool_grid x pool_grid`` tokens per image.
        language: transformers config dict with ``model_type`` (native only).
        vlm: transformers config dict with ``model_type`` of a vision-language model (vlm only).
        cnn: the architecture of a ``cnn`` preset (``bc_cnn.ARCH_KEYS``; ``model.extra`` overrides).
        channels_last: run the CNN in channels-last memory format (~1.5x faster on CPU here).
        keypoints: spatial-softmax keypoints of the last CNN map, added as one token per image.
        film: FiLM-condition every CNN stage on the instruction (native only).
        keypoint_tokens: one token per keypoint (its x, y and the feature under it), not one for all.
        keypoint_window: read each keypoint within this many cells of its heat map's peak (0: the
            whole map, a global soft-argmax).
        film_window: FiLM reads the instruction through a causal attention window of this many
            tokens in every language layer (0: each token sees the whole instruction before it).
        trunk_window: the policy's sequence reads its instruction tokens through such a window too
            (they still see every image token; the action queries see everything; 0: off).
        description: one line for listings.
    """

    name: str
    kind: Literal["native", "vlm", "cnn"]
    vision: str | None = None
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    pool_grid: int = 2
    language: dict[str, Any] = field(default_factory=dict)
    vlm: dict[str, Any] = field(default_factory=dict)
    cnn: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True
    keypoints: int = 0
    film: bool = False
    keypoint_tokens: bool = False
    keypoint_window: int = 0
    film_window: int = 0
    trunk_window: int = 0
    description: str = ""


def _llama(width: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int = 384) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }


def _smolvlm(text: dict[str, Any]) -> dict[str, Any]:
    """Idefics3 config with SmolVLM's SigLIP-B/16 @ 512 px vision tower and pixel-shuffle factor 4."""
    vision = {
        "model_type": "idefics3_vision",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    }
    return {
        "model_type": "idefics3",
        "scale_factor": 4,
        "image_token_id": 49190,
        "vision_config": vision,
        "text_config": text,
    }


_SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49280,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
_SMOLLM2_360M = {
    **_SMOLLM2_135M,
    "hidden_size": 960,
    "intermediate_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 15,
    "num_key_value_heads": 5,
}

PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add a preset to the registry (name must be new)."""
    if preset.name in PRESETS:
        raise ValueError(f"preset '{preset.name}' is registered twice")
    PRESETS[preset.name] = preset
    return preset


register(
    Preset(
        name="tiny",
        kind="native",
        vision="resnet18",
        # 3-conv "deep_tiered" stem (6-8-16 channels): 96 ms vs 138 ms vision fwd+bwd for the 7x7 stem at
        # batch 128 x 64 px on 2 cores, and better localization (docs/models.md). NCHW is faster for it.
        # output_stride 8 keeps an 8x8 map at 64 px (the default stride 32 leaves 2x2, which pooling cannot
        # localize a 4 px cube in); FiLM lets the instruction pick what the CNN extracts; 8 keypoint tokens
        # per image carry "where" (x, y) and "what" (the feature under the keypoint) to the LM (docs/models.md).
        vision_kwargs={
            "layers": [1, 1, 1, 1],
            "channels": [16, 32, 64, 128],
            "stem_width": 8,
            "stem_type": "deep_tiered",
            "output_stride": 8,
        },
        pool_grid=2,
        channels_last=False,
        keypoints=8,
        keypoint_tokens=True,
        film=True,
        language=_llama(width=128, layers=2, heads=4, kv_heads=4, ffn=256),
        description="~0.85M params: narrow ResNet (timm, stride 8) FiLM-conditioned on the instruction, "
        "keypoint tokens + 2-layer 128-wide Llama; CPU training",
    )
)
register(
    Preset(
        name="small",
        kind="native",
        vision="resnet18",
        pool_grid=2,
        language=_llama(width=512, layers=6, heads=8, kv_heads=8, ffn=1536),
        description="~33M params: ResNet-18 (timm) + 6-layer 512-wide Llama",
    )
)
register(
    Preset(
        name="tiny-vlm",
        kind="vlm",
        vlm={
            "model_type": "idefics3",
            "scale_factor": 2,
            "image_token_id": 383,
            "vision_config": {
                "model_type": "idefics3_vision",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 64,
                "patch_size": 16,
            },
            "text_config": _llama(width=128, layers=2, heads=4, kv_heads=2, ffn=256),
        },
        description="tiny Idefics3 (SmolVLM class) from config, for tests",
    )
)
register(
    Preset(
        name="smolvlm-256m",
        kind="vlm",
        vlm=_smolvlm(_SMOLLM2_135M),
        description="SmolVLM-256M architecture (Idefics3: SigLIP-B/16-512 + SmolLM2-135M), random weights",
    )
)
register(
    Preset(
        name="smolvlm-500m",
        kind="vlm",
        vlm=_smolvlm(_SMOLLM2_360M),
        description="SmolVLM-500M architecture (Idefics3: SigLIP-B/16-512 + SmolLM2-360M), random weights",
    )
)

register(
    Preset(
        name="bc-cnn",
        kind="cnn",
        # the plain behaviour-cloning baseline (~1.7M parameters at 2 cameras; docs/models.md): per camera
        # 3x3 conv-ReLU 32-32-64-64 (strides 2-1-2-1: a 20x20 map at 80 px) read out as 32 spatial-softmax
        # keypoints (-> 64) + the map's mean (64); state -> 64; instruction tokens + positions -> 64,
        # mean-pooled; concatenated -> MLP 2 x 512 -> the action head per chunk step, the task head
        cnn={
            "channels": [32, 32, 64, 64],
            "strides": [2, 1, 2, 1],
            "keypoints": 32,
            "keypoint_features": 64,
            "text_features": 64,
            "state_features": 64,
            "max_tokens": 256,
            "width": 512,
            "depth": 2,
            "vocab_size": 384,  # the byte-level tokenizer's (vla_ft/models/tokenizer.py)
        },
        description="~1.7M params: plain CNN behaviour cloning (per-camera convs + spatial softmax, "
        "mean-pooled instruction embedding, MLP 2x512), no transformer: the baseline to beat",
    )
)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a ConfigError listing the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"model.preset={name!r} is unknown{hint}; choose one of: {', '.join(list_presets())}"
        )
    return PRESETS[name]
