"""Language backbone: any transformers causal LM or encoder, by config dict, name or local dir."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vla_ft.errors import CheckpointError, ConfigError

_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def build_hf_config(spec: dict[str, Any], key: str) -> PretrainedConfig:
    """A transformers config from ``{"model_type": ..., **fields}``.

    Raises:
        ConfigError: unknown ``model_type`` (names ``key``).
    """
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **spec)
    except ValueError as exc:
        raise ConfigError(
            f"{key}: model_type={model_type!r} is not a transformers model type ({exc})"
        ) from None


def hub_or_dir(name: str, key: str) -> str:
    """Check that ``name`` is a local dir or, when online, a hub id; fail fast offline.

    Raises:
        CheckpointError: ``name`` is not a local dir and the hub is offline (HF_HUB_OFFLINE).
    """
    if Path(name).is_dir():
        return name
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{key}={name!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1): "
            "download it elsewhere and give its directory, or use a preset"
        )
    return name


def load_hf_model(
    auto_cls: Any, spec: str | dict[str, Any], key: str, trust_remote_code: bool
) -> PreTrainedModel:
    """Build from a config dict (random init) or load ``from_pretrained`` from a dir / hub id.

    Always in float32, whatever dtype the config or checkpoint names (transformers would otherwise
    build a ``"torch_dtype": "bfloat16"`` model in bf16): the weights are the optimizer's master
    copy, and mixed precision comes from autocast (``train.precision``)."""
    if isinstance(spec, dict):
        return auto_cls.from_config(
            build_hf_config(spec, key), trust_remote_code=trust_remote_code, dtype=torch.float32
        )
    source = hub_or_dir(spec, key)
    try:
        return auto_cls.from_pretrained(source, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except OSError as exc:
        raise CheckpointError(f"{key}={spec!r}: cannot load a transformers model from it ({exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{key}={spec!r}: not loadable with {auto_cls.__name__} ({exc})") from None


class LanguageBackbone(nn.Module):
    """A transformers base model (no LM head) run on input embeddings.

    Args:
        spec: config dict with ``model_type`` (random init) or a model dir / hub id.
        trust_remote_code: passed to transformers (off unless the user turns it on).
    """

    def __init__(self, spec: str | dict[str, Any], trust_remote_code: bool = False) -> None:
        super().__init__()
        self.model = load_hf_model(AutoModel, spec, "model.language", trust_remote_code)
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_blocks = int(getattr(self.model.config, "num_hidden_layers", 0))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, L, D)."""
        return self.model.get_input_embeddings()(ids)

    def forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        window: int = 0,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """(B, N, D) embeddings + (B, N) attention mask -> (B, N, D) final hidden states.

        ``window > 0``: each token attends only to the real tokens among itself and the
        ``window - 1`` positions before it (a causal sliding window, :func:`window_mask`); with
        ``span = (start, end)`` only among the tokens of that span, the rest attending causally.
        """
        attn: torch.Tensor = mask if window <= 0 else window_mask(mask, window, span)
        out = self.model(
            inputs_embeds=embeds, attention_mask=attn, position_ids=packed_positions(mask), use_cache=False
        )
        return out.last_hidden_state

    def set_gradient_checkpointing(self, enable: bool) -> None:
        set_hf_checkpointing(self.model, enable)

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Embeddings depth 0, block i depth i+1, final norm depth num_blocks+1."""
        return transformer_depths(self.model, self.num_blocks)


def window_mask(mask: torch.Tensor, window: int, span: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, N) padding mask -> (B, 1, N, N) boolean attention mask (True: attend) of a causal
    sliding window: query i sees key j when ``i - window < j <= i`` and j is a real token. With
    ``span = (start, end)`` the window holds between two tokens of ``start <= i, j < end`` only:
    every other pair attends causally (e.g. an instruction read in windows, with the image tokens
    before it and the action queries after it seeing everything). Every query also sees itself, so
    a padding row is never empty (softmax over nothing is NaN); padding outputs are ignored by
    their callers. transformers uses a 4D mask as given."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device)
    offset = idx[:, None] - idx[None, :]  # (N, N) query minus key
    band = offset < window
    if span is not None:
        inside = (idx >= span[0]) & (idx < span[1])
        band = band | ~(inside[:, None] & inside[None, :])
    band = band & (offset >= 0)
    keep = band[None] & mask.bool()[:, None, :]  # (B, N, N)
    keep = keep | torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    return keep[:, None]


def packed_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: (B, N) mask -> (B, N) ids 0, 1, ... over the real tokens.

    Padding inside the sequence (between the instruction and the action queries) would otherwise
    shift the queries' positions by the batch's longest instruction, so a sample's output would
    depend on the other samples in its batch and differ between training and inference.
    """
    return (mask.long().cumsum(1) - 1).clamp_(min=0)


def transformer_depths(module: nn.Module, num_blocks: int) -> tuple[dict[str, int], int]:
    """Depth per parameter of a transformer stack by its ``layers.<i>.`` names.

    Parameters before the first block (names containing ``embed``) get 0, block ``i`` gets
    ``i + 1``, everything else (final norms, poolers) gets ``num_blocks + 1``.
    """
    depth = {}
    for name, _ in module.named_parameters():
        m = _BLOCK.search(name)
        if m:
            depth[name] = int(m.group(1)) + 1
        elif "embed" in name:
            depth[name] = 0
        else:
            depth[name] = num_blocks + 1
    return depth, num_blocks + 2


def set_hf_checkpointing(model: PreTrainedModel, enable: bool) -> None:
    """Activation checkpointing on a transformers model (non-reentrant; v5 API when present)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
