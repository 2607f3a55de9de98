"""Where a policy comes from: ``model.pretrained`` resolved to a path or hub id and checked, and the
tokenizer the policy will use (known before the model loads: the data is tokenized first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_ft.config import REPO_ROOT
from vla_ft.models.language import hub_or_dir
from vla_ft.models.loading import check_checkpoint
from vla_ft.models.presets import get_preset
from vla_ft.models.tokenizer import byte_tokenizer, has_tokenizer, read_tokenizer


def resolve_pretrained(spec: str | None) -> str | None:
    """A relative checkpoint path is tried against the working directory, then the repo root."""
    if spec is None:
        return None
    if not Path(spec).exists() and (REPO_ROOT / spec).exists():
        return str(REPO_ROOT / spec)
    return spec


def check_source(model_cfg: Any) -> None:
    """``model.pretrained`` names a readable checkpoint (verified against its manifest), a hub id
    reachable now, or nothing; ``model.preset`` a known preset when nothing is loaded."""
    spec = model_cfg.pretrained
    if spec is None:
        get_preset(model_cfg.preset)
    elif Path(spec).exists() or spec.startswith((".", "/")) or "/" not in spec:
        check_checkpoint(Path(spec))
    else:
        hub_or_dir(spec, "model.pretrained")


def load_tokenizer(model_cfg: Any) -> Any:
    """The tokenizer a policy built/loaded from ``model_cfg`` will use (needed before the data loads).

    A checkpoint dir's saved tokenizer; else the tokenizer in the ``model.vlm`` / ``model.language``
    dir when it has one; else the byte-level tokenizer.
    """
    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    if model_cfg.pretrained is not None and Path(model_cfg.pretrained).is_dir():
        from vla_ft.models.smolvla_policy import is_smolvla_dir, smolvla_tokenizer

        if is_smolvla_dir(model_cfg.pretrained):  # its SmolVLM tokenizer with LeRobot's text rules
            return smolvla_tokenizer(model_cfg.pretrained, model_cfg.vlm)
    for source in (model_cfg.pretrained, model_cfg.vlm, model_cfg.language):
        if source is not None and Path(source).is_dir() and has_tokenizer(source):
            return read_tokenizer(source, trust)
    return byte_tokenizer()
