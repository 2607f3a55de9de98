"""LoRA through peft: adapters on a frozen backbone, the new-task parts fully trainable.

``apply_lora(policy, model_cfg.lora)`` (called by ``run_finetune`` right after ``load_vla``):

* injects peft LoRA layers (``peft.inject_adapter_in_model``) into every ``nn.Linear`` and
  ``nn.Conv2d`` of the backbone modules named in ``model.lora.target`` (``language``: attention and
  MLP projections; ``projector``; ``vision``: the CNN's convolutions, or a ViT's linears), except
  dilated or grouped convolutions, which peft's conv adapter does not reproduce (:func:`adaptable`);
* freezes every other backbone parameter (embeddings, norms, ...);
* keeps every parameter outside the backbone trainable: action and task heads, action queries,
  readout, state projection and state-to-FiLM map, view embeddings. They are new for the task (the heads may even be
  re-initialized by ``load_vla``), so they are trained in full: peft's ``modules_to_save`` practice.

The policy stays a ``VLAPolicy`` (its class becomes :class:`LoRAPolicy`): ``forward``,
``predict_action``, ``param_info`` and the training loop work unchanged. ``save_pretrained`` writes
the MERGED weights (``W + (alpha / r) * B @ A`` per adapted layer, merged by peft into a plain copy
of the policy on the CPU; the training model is not touched), so a checkpoint of a LoRA run is an ordinary checkpoint of our format that ``VLAPolicy.from_pretrained``
loads for evaluation. Beside it, ``lora/`` keeps what merging cannot give back exactly: the unmerged
state (frozen base weights, adapters, heads; peft names) and the LoRA settings, from which
``apply_lora(..., resume=ckpt)`` rebuilds the adapted model bit for bit (``train.resume``).

Costs: a save builds the merged copy in CPU memory (one more copy of the weights while it is
written; none on the GPU) and the checkpoint holds the weights twice (merged + unmerged).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_ft.config import LoraConfig
from vla_ft.errors import CheckpointError, ConfigError
from vla_ft.models.loading import read_format_json
from vla_ft.models.params import count_parameters
from vla_ft.models.policy import VLAPolicy

LORA_DIR = "lora"  # inside a checkpoint directory
LORA_STATE, LORA_META = "unmerged.safetensors", "lora.json"
LORA_FORMAT = "vla_ft.lora"
ADAPTED_TYPES = (nn.Linear, nn.Conv2d)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            "model.lora.r > 0 needs the peft package: pip install -e '.[lora]' (or set model.lora.r=0 "
            "for full fine-tuning)"
        ) from None
    return peft


def adaptable(module: nn.Module) -> bool:
    """Whether peft's LoRA reproduces ``module``'s geometry: any ``nn.Linear``; an ``nn.Conv2d`` only
    without dilation and groups and with zero padding (peft's ``lora_A`` copies kernel size, stride
    and padding but not dilation or padding mode, so the adapter's output would not line up)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.dilation == (1, 1) and module.groups == 1 and module.padding_mode == "zeros"
    return False


def target_modules(policy: VLAPolicy, targets: list[str]) -> tuple[list[str], list[str]]:
    """The layers (names relative to ``policy``) of the backbone modules ``targets`` that get adapters.

    A layer belongs to the module (``language``, ``projector``, ``vision``) that the backbone's
    ``depths()`` assigns to its weight, so native and VLM backbones are handled alike.

    Returns:
        (adapted layer names, skipped layer names: Conv2d layers peft cannot adapt, see :func:`adaptable`).

    Raises:
        ConfigError: no layer of a named module can take an adapter.
    """
    depths = policy.backbone.depths()  # param name (under backbone) -> (module, depth, layers)
    found: dict[str, list[str]] = {t: [] for t in targets}
    skipped = []
    for name, module in policy.backbone.named_modules():
        if isinstance(module, ADAPTED_TYPES):
            group = depths.get(f"{name}.weight", (None,))[0]
            if group in found:
                (found[group] if adaptable(module) else skipped).append(f"backbone.{name}")
    empty = [t for t, names in found.items() if not names]
    if empty:
        raise ConfigError(
            f"model.lora.target={targets}: {', '.join(empty)} has no Linear/Conv2d layer that LoRA can "
            f"adapt in this model; remove it from model.lora.target"
        )
    return [name for names in found.values() for name in names], skipped


def is_lora_parameter(name: str) -> bool:
    """True for the adapter weights peft adds (``...lora_A.<adapter>.weight`` etc.)."""
    return ".lora_" in name


def _adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state with every adapter merged into its base weights, as detached CPU copies.

    The names are those of the model before LoRA was injected. peft does the merge
    (``merge(safe_merge=True)``: ``W + (alpha / r) * B @ A``, an error on non-finite results) on a
    copy of one adapted layer at a time, so ``model`` is never modified.
    """
    layers = dict(_adapter_layers(model))
    merged: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tmp = copy.deepcopy(layer)
        tmp.merge(safe_merge=True)
        for key, value in tmp.get_base_layer().state_dict().items():
            merged[f"{name}.{key}"] = value
    out = {}
    for key, value in model.state_dict().items():
        if is_lora_parameter(key):
            continue
        head, sep, tail = key.rpartition(".base_layer.")
        if sep and head in layers:
            key = f"{head}.{tail}"
            value = merged[key]
        out[key] = value.detach().to("cpu", copy=True)
    return out


class LoRAPolicy(VLAPolicy):
    """A ``VLAPolicy`` with peft LoRA layers in its backbone (made by :func:`apply_lora` only).

    Everything but saving is inherited: training and inference run through the adapters.
    """

    def merged(self) -> VLAPolicy:
        """A plain ``VLAPolicy`` on the CPU with the adapters merged into its weights (``self`` unchanged)."""
        from vla_ft.models.loading import build_policy

        with torch.random.fork_rng(devices=[]):  # building draws init values: keep the training RNG
            out = build_policy(self.cfg, self.dims, arch=self.arch)
        out.load_state_dict(merged_state_dict(self), strict=True)
        out.tokenizer = self.tokenizer
        out.set_normalizer(self.normalizer)
        return out

    def save_pretrained(self, out_dir: Any, manifest: bool = True) -> Path:
        """Write the merged model in our format, plus ``lora/`` (unmerged state + settings) for resume."""
        from safetensors.torch import save_model

        from vla_ft.integrity import write_manifest

        path = Path(self.merged().save_pretrained(out_dir, manifest=False))
        lora_dir = path / LORA_DIR
        lora_dir.mkdir(parents=True, exist_ok=True)
        save_model(self, str(lora_dir / LORA_STATE))  # drops duplicate names of tied tensors
        meta = {
            "format": LORA_FORMAT,
            "lora": dataclasses.asdict(self.cfg.lora),
            "modules": [name for name, _ in _adapter_layers(self)],
            "note": "model.safetensors one level up holds the merged weights (load it with "
            "VLAPolicy.from_pretrained); this directory is only needed to resume LoRA training",
        }
        (lora_dir / LORA_META).write_text(json.dumps(meta, indent=1))
        if manifest:
            write_manifest(path)
        return path


def read_lora_meta(ckpt: str | Path) -> dict[str, Any] | None:
    """The ``lora/lora.json`` of a checkpoint directory, or None for a checkpoint without adapters."""
    meta_file = Path(ckpt) / LORA_DIR / LORA_META
    if not meta_file.is_file():
        return None
    return read_format_json(meta_file, LORA_FORMAT)


def _check_resume(cfg: LoraConfig, resume: Path | None) -> dict[str, Any] | None:
    if resume is None:
        return None
    meta = read_lora_meta(resume)
    if meta is None and cfg.r > 0:
        raise CheckpointError(
            f"train.resume: {resume} was trained without LoRA (full fine-tuning); resume it with "
            f"model.lora.r=0, or start a new LoRA run from it with model.pretrained={resume}"
        )
    if meta is not None and meta["lora"] != dataclasses.asdict(cfg):
        raise CheckpointError(
            f"train.resume: {resume} was trained with model.lora={meta['lora']}, but this run has "
            f"model.lora={dataclasses.asdict(cfg)}; resume with the checkpoint's model.lora settings"
        )
    return meta


def apply_lora(policy: VLAPolicy, cfg: LoraConfig, resume: str | Path | None = None) -> VLAPolicy:
    """Inject LoRA adapters (``cfg.r > 0``) and freeze the rest of the backbone, in place.

    Args:
        policy: a freshly loaded ``VLAPolicy`` (from ``load_vla``), before it moves to the device.
        cfg: the ``model.lora`` section; ``r == 0`` returns ``policy`` unchanged.
        resume: a checkpoint directory to resume from: its ``lora/`` state is loaded into the
            adapted model (the checkpoint must have been trained with the same ``model.lora``).

    Returns:
        The same object, now a :class:`LoRAPolicy` (or unchanged for ``r == 0``).

    Raises:
        ConfigError: the policy takes no adapters (``policy.lora_problem``), peft is missing, or a
            target module has no adaptable layer.
        CheckpointError: ``resume`` does not match ``cfg`` (with or without LoRA, other settings).
    """
    resume = Path(resume) if resume is not None else None
    meta = _check_resume(cfg, resume)
    if cfg.r == 0:
        return policy
    problem = policy.lora_problem(cfg.r)  # a kind of policy without a backbone LoRA can adapt
    if problem is not None:
        raise ConfigError(problem)
    if isinstance(policy, LoRAPolicy):
        raise ConfigError("apply_lora: this policy already has LoRA adapters")
    peft = _peft()
    modules, skipped = target_modules(policy, cfg.target)
    before_total = count_parameters(policy)[1]
    peft_cfg = peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.scale_alpha, lora_dropout=cfg.dropout, target_modules=modules, bias="none"
    )
    peft.inject_adapter_in_model(peft_cfg, policy)
    for name, param in policy.named_parameters():
        param.requires_grad_(is_lora_parameter(name) or not name.startswith("backbone."))
    policy.__class__ = LoRAPolicy
    if meta is not None:
        from safetensors.torch import load_model

        state = resume / LORA_DIR / LORA_STATE
        if not state.is_file():
            raise CheckpointError(f"{state} is missing: this LoRA checkpoint cannot resume training")
        load_model(policy, str(state), strict=True)
    trainable, total = count_parameters(policy)
    adapters = sum(p.numel() for n, p in policy.named_parameters() if is_lora_parameter(n))
    print(
        f"[vla_ft.lora] r={cfg.r} alpha={cfg.scale_alpha:g} on {len(modules)} layers "
        f"({', '.join(cfg.target)}): {adapters:,} adapter parameters (+{100.0 * adapters / before_total:.1f}% "
        f"of the model); trainable {trainable:,} / {total:,} ({100.0 * trainable / total:.1f}%) with the "
        f"new-task parts outside the backbone"
        + (f"; {len(skipped)} dilated/grouped conv layers stay frozen without adapters" if skipped else "")
    )
    return policy
