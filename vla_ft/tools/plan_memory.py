"""Peak GPU memory per rank of one full fine-tuning step, predicted before anything is allocated.

    vla-ft plan-memory --cfg pick_place.yaml model.preset=smolvlm-500m train.batch_size=16

The policy is built on the meta device (no weights; an HF backbone given by name or directory
contributes only its config.json; vla_ft/tools/memory_arch.py reads its units) and the plan adds
up, per rank, in bytes:

* weights: fp32 master weights (sharded 1/W under FSDP, plus the unsharded ``param_dtype`` copies
  of the root unit and of two blocks, current and prefetched; none kept on the GPU with CPU offload);
* gradients: fp32, one per trainable weight (sharded 1/W under FSDP; with ``optimizer_in_backward``
  only one tensor's gradient lives at a time);
* optimizer state: AdamW's exp_avg + exp_avg_sq, 8 bytes per trainable weight; torchao's 8-bit
  AdamW 2 bytes + a fp32 scale per 256 values (tensors under 4,096 values stay fp32);
* activations saved for backward (memory_arch), times the per-rank micro-batch, plus the bf16
  weight copies autocast saves (none under FSDP's bf16 parameters).

The backward is walked from the output down (heads, language layers, projector, vision): at each
unit the gradients produced so far and the activations not yet freed are alive (plus, under
checkpointing, the unit's recomputed activations); the peak is the largest such sum on top of
weights and optimizer state, or the optimizer step's (all gradients). Not counted: the CUDA
context and the caching allocator's fragmentation (``fits`` leaves ``headroom_gb`` and 10%), NCCL
buffers, torch.compile workspaces.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_ft.config import Config
from vla_ft.tools.memory_arch import Arch, Unit, data_dims, data_tokens, describe, meta_policy

GIB = 2**30
RESERVE = 1.10  # caching-allocator slack over torch's allocated peak


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How the step runs (what the advice varies)."""

    micro_batch: int  # samples per rank per micro-batch
    world_size: int = 1
    parallel: str = "none"  # none | ddp | fsdp
    precision: str = "bf16"  # fp32 | bf16 | fp16
    checkpointing: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit
    optimizer_in_backward: bool = False
    cpu_offload: bool = False


@dataclass
class Plan:
    """Predicted bytes per rank; ``peak`` is what ``torch.cuda.max_memory_allocated`` should read."""

    setting: Setting
    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    peak: float
    advice: list[tuple[str, float]] = field(default_factory=list)

    def fits(self, gpu_gb: float, headroom_gb: float = 2.0) -> bool:
        return self.peak * RESERVE + headroom_gb * GIB <= gpu_gb * GIB


def _optimizer_bytes(arch: Arch, optimizer: str) -> float:
    if optimizer == "adamw8bit":
        return float(
            sum(n * (2 + 8 / 256) if n >= 4096 and n % 256 == 0 else 8 * n for n in arch.tensor_numels)
        )
    return 8.0 * sum(arch.tensor_numels)


def estimate(arch: Arch, s: Setting) -> Plan:
    """The per-rank memory of one training step of ``arch`` run as ``s`` (see module docstring)."""
    bf16 = s.precision in ("bf16", "fp16")
    fsdp = s.parallel == "fsdp"
    shard = s.world_size if fsdp else 1
    pdtype = 2 if bf16 else 4  # FSDP's unsharded parameter dtype
    trainable = sum(arch.tensor_numels)
    if fsdp:  # root unit stays unsharded through forward and backward; two blocks in flight
        transient_w = pdtype * (arch.root_params + 2 * arch.block_params)
        weights = (0.0 if s.cpu_offload else 4.0 * arch.params / shard) + transient_w
    else:
        transient_w, weights = 0.0, 4.0 * arch.params
    optimizer = 0.0 if s.cpu_offload else _optimizer_bytes(arch, s.optimizer) / shard
    grad_scale = 0.0 if (s.cpu_offload or s.optimizer_in_backward) else 4.0 / shard
    # FSDP: a block's unsharded gradient (param dtype) and its fp32 copy for the reduce-scatter
    grad_transient = (pdtype + 4.0) * arch.block_params if fsdp else 0.0
    if s.optimizer_in_backward:
        grad_transient = 4.0 * arch.largest_tensor

    def acts(u: Unit) -> float:  # per sample
        if s.checkpointing and u.checkpointable:
            return u.acts_ckpt_bf16 if bf16 and u.acts_ckpt_bf16 is not None else u.acts_ckpt
        return u.acts_bf16 if bf16 else u.acts

    def copies(u: Unit) -> float:  # per step: autocast's bf16 weight copies (FSDP: params are bf16)
        if not bf16 or fsdp or (s.checkpointing and u.checkpointable):
            return 0.0
        return 2.0 * u.matmul_params

    seq = [u for u in arch.units for _ in range(u.layers)]
    activations = sum(acts(u) * s.micro_batch + copies(u) for u in seq)
    alive, grads, peak_bwd = activations, 0.0, activations
    for u in seq:  # backward, output first
        recompute = 0.0
        if s.checkpointing and u.checkpointable:  # the layer's activations, rebuilt for its backward
            recompute = (u.acts_bf16 if bf16 else u.acts) * s.micro_batch + (
                2.0 * u.matmul_params if bf16 and not fsdp else 0.0
            )
        peak_bwd = max(peak_bwd, alive + grads + recompute)
        alive -= acts(u) * s.micro_batch + copies(u)
        grads += u.params * grad_scale
    grad_total = trainable * grad_scale
    static = weights + optimizer
    peak = max(static + peak_bwd + grad_transient, static + grad_total + grad_transient)
    return Plan(s, weights, grad_total, optimizer, activations, transient_w + grad_transient, peak)


def advise(arch: Arch, s: Setting, gpu_gb: float, headroom_gb: float = 2.0) -> list[tuple[str, float]]:
    """Changes that lower the peak, each with its predicted peak: a cumulative path (each change on
    top of the previous ones, stopping once it fits) and, for one process, the alternative of
    stepping the optimizer in backward. Empty when ``s`` already fits."""
    out: list[tuple[str, float]] = []

    def fits(setting: Setting) -> bool:
        return estimate(arch, setting).fits(gpu_gb, headroom_gb)

    def add(label: str, setting: Setting) -> Setting:
        peak = estimate(arch, setting).peak
        if out and not label.startswith("or:") and peak >= 0.99 * out[-1][1]:
            return setting  # no gain worth a line (e.g. checkpointing when the optimizer step peaks)
        out.append((label, peak))
        return setting

    if fits(s):
        return out
    cur = s
    if not s.checkpointing:
        cur = add("model.gradient_checkpointing=true", dataclasses.replace(cur, checkpointing=True))
    ckpt = cur
    if not fits(cur) and s.optimizer == "adamw" and not s.cpu_offload:
        cur = add(
            "+ train.optimizer=adamw8bit (extra `lowmem`)", dataclasses.replace(cur, optimizer="adamw8bit")
        )
    if not fits(cur) and s.parallel != "fsdp" and s.world_size > 1:
        cur = add(f"+ train.parallel=fsdp ({s.world_size} ranks)", dataclasses.replace(cur, parallel="fsdp"))
    accum = 1
    while cur.micro_batch > 1 and not fits(cur):
        accum *= 2
        cur = dataclasses.replace(cur, micro_batch=max(1, cur.micro_batch // 2))
        add(f"+ micro-batch {cur.micro_batch} (train.grad_accum x{accum}, same global batch)", cur)
    if not fits(cur) and not cur.cpu_offload:
        cur = dataclasses.replace(cur, parallel="fsdp", cpu_offload=True, optimizer="adamw")
        add("+ train.parallel=fsdp train.cpu_offload=true (weights, grads, optimizer state on CPU)", cur)
    if s.parallel == "none" and s.optimizer == "adamw" and not s.optimizer_in_backward:
        alt = dataclasses.replace(ckpt, optimizer_in_backward=True)
        add("or: checkpointing + train.optimizer_in_backward=true train.grad_clip=0 (grad_accum 1)", alt)
    return out


# --------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------


def setting_from_config(cfg: Config, world_size: int, precision: str) -> Setting:
    from vla_ft.train.distributed import micro_batch_size

    tc = cfg.train
    return Setting(
        micro_batch=micro_batch_size(tc.batch_size, tc.grad_accum, world_size),
        world_size=world_size,
        parallel=tc.parallel,
        precision=precision,
        checkpointing=cfg.model.gradient_checkpointing,
        optimizer=tc.optimizer,
        optimizer_in_backward=tc.optimizer_in_backward,
        cpu_offload=tc.cpu_offload,
    )


def plan_config(
    cfg: Config, world_size: int = 1, precision: str = "bf16", dims: Any = None, arch: dict | None = None
) -> tuple[Arch, Plan]:
    """The plan for a run config.

    Args:
        cfg: the run config (model, data shapes, train settings).
        world_size: ranks (``train.batch_size`` is the global batch).
        precision: ``fp32 | bf16 | fp16`` (``auto`` resolved by the caller).
        dims: the data's ``ModelDims`` (default: :func:`data_dims` of the config).
        arch: an already resolved architecture dict (a live policy's ``policy.arch``).
    """
    dims = dims if dims is not None else data_dims(cfg)
    if arch is None:
        policy = meta_policy(cfg, dims)
    elif arch.get("kind") == "smolvla":
        from vla_ft.tools.memory_arch import smolvla_meta_policy

        policy = smolvla_meta_policy(arch["path"], cfg.model, dims)
    else:
        from vla_ft.models.loading import build_policy

        with torch.device("meta"):
            policy = build_policy(dataclasses.replace(cfg.model, pretrained=None), dims, arch=arch)
        policy.train()
    described = describe(policy, data_tokens(cfg, dims))
    return described, estimate(described, setting_from_config(cfg, world_size, precision))


def warn_if_out_of_memory(
    cfg: Config, policy: nn.Module, info: Any, world_size: int, device: torch.device
) -> Plan:
    """The trainer's check at start (CUDA): print the plan's peak and warn when it will not fit.

    The plan assumes full fine-tuning of ``policy.arch`` (with LoRA it over-estimates)."""
    import warnings

    from vla_ft.models import ModelDims
    from vla_ft.train.step import resolve_precision

    precision = resolve_precision(cfg.train.precision, device)
    arch, plan = plan_config(cfg, world_size, precision, ModelDims.from_info(info), policy.arch)
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / GIB
    print(
        f"[vla-ft] memory plan: peak {plan.peak / GIB:.1f} GiB per GPU of {gpu_gb:.0f} GiB (weights "
        f"{plan.weights / GIB:.1f}, grads {plan.gradients / GIB:.1f}, optimizer {plan.optimizer / GIB:.1f}, "
        f"activations {plan.activations / GIB:.1f})"
    )
    if not plan.fits(gpu_gb):
        tips = "; ".join(
            f"{label} -> {peak / GIB:.1f} GiB" for label, peak in advise(arch, plan.setting, gpu_gb)
        )
        warnings.warn(
            f"predicted peak {plan.peak / GIB:.1f} GiB per GPU will not fit this {gpu_gb:.0f} GiB GPU "
            f"(vla-ft plan-memory prints the table). Try: {tips}",
            stacklevel=2,
        )
    return plan


def report(cfg: Config, world_size: int, precision: str, gpu_gb: float, headroom_gb: float = 2.0) -> dict:
    """Everything ``vla-ft plan-memory`` prints and writes: the plan of the config as given, the
    same with activation checkpointing flipped, whether it fits ``gpu_gb`` and the advice."""
    arch, plan = plan_config(cfg, world_size, precision)
    flipped = estimate(arch, dataclasses.replace(plan.setting, checkpointing=not plan.setting.checkpointing))
    gib = lambda x: round(x / GIB, 3)  # noqa: E731

    def as_dict(p: Plan) -> dict:
        parts = ("weights", "gradients", "optimizer", "activations", "transient", "peak")
        return {**{f"{k}_gib": gib(getattr(p, k)) for k in parts}, "setting": dataclasses.asdict(p.setting)}

    return {
        "model": arch.name,
        "params": arch.params,
        "trainable": sum(arch.tensor_numels),
        "tokens": arch.tokens,
        "global_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "gpu_gb": gpu_gb,
        "headroom_gb": headroom_gb,
        "plan": as_dict(plan),
        "fits": plan.fits(gpu_gb, headroom_gb),
        "with_checkpointing_flipped": as_dict(flipped),
        "advice": [
            {"change": label, "peak_gib": gib(peak)}
            for label, peak in advise(arch, plan.setting, gpu_gb, headroom_gb)
        ],
    }


def format_report(r: dict) -> str:
    """The report as a table (GiB per rank)."""
    s, p, q = r["plan"]["setting"], r["plan"], r["with_checkpointing_flipped"]
    ckpt = "on" if s["checkpointing"] else "off"
    lines = [
        f"model {r['model']}: {r['params'] / 1e6:,.1f}M parameters ({r['trainable'] / 1e6:,.1f}M trainable); "
        f"{r['tokens']['sequence']} tokens per sample ({r['tokens']['views']} views x "
        f"{r['tokens']['image_tokens_per_view']} image tokens + state, instruction, chunk, readout)",
        f"{s['parallel']} x {s['world_size']} rank(s), global batch {r['global_batch']} = micro-batch "
        f"{s['micro_batch']} x accum {r['grad_accum']} x ranks, {s['precision']}, optimizer {s['optimizer']}"
        f"{' (in backward)' if s['optimizer_in_backward'] else ''}{', CPU offload' if s['cpu_offload'] else ''}",
        "",
        f"{'GiB per rank':<22}{'checkpointing ' + ckpt:>20}{'checkpointing ' + ('off' if ckpt == 'on' else 'on'):>20}",
    ]
    for key, label in (
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer", "optimizer state"),
        ("activations", "activations"),
        ("transient", "transient (FSDP)"),
        ("peak", "peak"),
    ):
        lines.append(f"{label:<22}{p[key + '_gib']:>20.2f}{q[key + '_gib']:>20.2f}")
    verdict = "fits" if r["fits"] else "does NOT fit"
    lines.append(
        f"\n{verdict} a {r['gpu_gb']:g} GiB GPU (peak x {RESERVE:.2f} + {r['headroom_gb']:g} GiB headroom)"
    )
    if r["advice"]:
        lines.append("to fit, in order (each on top of the previous):")
        lines += [f"  {a['change']:<88} peak {a['peak_gib']:8.2f} GiB" for a in r["advice"]]
    return "\n".join(lines)


def print_plan(
    cfg: Config,
    world_size: int,
    precision: str,
    gpu_gb: float,
    headroom_gb: float = 2.0,
    json_path: str | Path | None = None,
) -> dict:
    """``vla-ft plan-memory``: print :func:`report` as a table (and write it as JSON to ``json_path``)."""
    result = report(cfg, world_size, precision, gpu_gb, headroom_gb)
    print(format_report(result))
    if json_path:
        out = Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result
