#!/usr/bin/env python
"""Training-step throughput and memory: the toolkit's step next to a bare PyTorch loop, same model
and batch, with the memory plan's predicted peak beside the measured one.

    python scripts/bench_train.py                       # tiny preset, CPU, fp32
    python scripts/bench_train.py --presets small,smolvlm-500m --device cuda --precision bf16 --batch 16
    python scripts/bench_train.py --presets small --vision vit_so400m_patch14_siglip_224 --image-size 224 \\
        --language docs/examples/llama2-7b --batch 8 --checkpointing --optimizer adamw8bit \\
        --no-bare --blocks 1 --steps 2 --warmup 1 --device cuda --precision bf16   # one 7B step

Both loops train the same freshly built policy (random weights; HF backbones given by directory
contribute only their config.json) on the same synthetic batch (bench_model's, two cameras): the
toolkit's ``train_step`` (parameter groups, combined loss with per-term metrics, autocast,
clipping, device-side NaN skip, fused AdamW or the chosen optimizer) and a plain ``AdamW`` + L1
loop on a deep copy (``--no-bare`` skips it, for models that do not fit twice). Blocks of steps
alternate between the two so machine noise hits both alike; the table reports the median block.

On CUDA: the toolkit's peak memory is measured in a phase of its own (after warm-up, before the
bare copy exists: ``torch.cuda.max_memory_allocated`` minus what was allocated before the model),
next to ``vla_ft.tools.plan_memory``'s plan for the same setting; MFU = FLOPs of one step (counted by
``torch.utils.flop_counter``) x steps/s / the GPU's dense bf16 peak; tokens/s counts the
language model's sequence (image tokens + state + instruction + chunk + readout). JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_model import synthetic_batch, synthetic_info  # noqa: E402

from vla_ft import constants as K  # noqa: E402
from vla_ft.config import Config, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from vla_ft.losses import ActionTaskLoss  # noqa: E402
from vla_ft.models import ModelDims, param_info  # noqa: E402
from vla_ft.models.loading import build_policy  # noqa: E402
from vla_ft.tools.memory_arch import config_arch, data_tokens, describe, meta_policy  # noqa: E402
from vla_ft.tools.plan_memory import GIB, estimate, setting_from_config  # noqa: E402
from vla_ft.train.optim import build_optimizer, build_param_groups  # noqa: E402
from vla_ft.train.step import autocast, resolve_device, resolve_precision, train_step  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(policy, batch, amp) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with amp():
            out = policy(batch)
        out[K.OUT_ACTION].float().abs().mean().backward()
    policy.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# Kernel-name fragments by category, for the profile summary (first match wins).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "efficient_attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm/softmax", ("norm", "softmax")),
    ("copy/cast", ("copy", "cast", "fill", "memcpy", "memset", "to_copy")),
)


def profile_steps(step, device: torch.device, out_dir: Path, name: str, steps: int = 3) -> dict:
    """Profile ``steps`` training steps: GPU busy share of the wall time and kernel time by kind.

    Writes ``<name>_ops.txt`` (the operator table by device time) and returns the summary."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    kinds: dict[str, float] = {}
    busy = 0.0
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        low = ev.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(f in low for f in keys)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e6
        busy += us / 1e6
    out_dir.mkdir(parents=True, exist_ok=True)
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=70)
    (out_dir / f"{name}_ops.txt").write_text(table)
    return {
        "steps": steps,
        "wall_s_per_step": wall / steps,
        "gpu_busy_share": busy / wall if wall else 0.0,
        "kernel_s_per_step": {k: v / steps for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def run_config(name: str, args) -> Config:
    cfg = Config()
    model = ModelConfig(
        preset=name, vision=args.vision, language=args.language, gradient_checkpointing=args.checkpointing
    )
    grad_clip = 0.0 if args.optimizer_in_backward else 1.0
    train = TrainConfig(
        lr=1e-4, warmup_steps=0, steps=10**6, batch_size=args.batch, optimizer=args.optimizer,
        optimizer_in_backward=args.optimizer_in_backward, grad_clip=grad_clip,
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, model=model, train=train)
    cfg.data.instruction_max_tokens = args.instr_tokens
    return cfg


def bench_preset(name: str, args, device: torch.device, precision: str) -> dict:
    info = synthetic_info(args.image_size, args.chunk)
    dims = ModelDims.from_info(info)
    cfg = run_config(name, args)
    batch = synthetic_batch(info, args.batch, args.instr_tokens, device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(0)
    with torch.device(device):
        policy = build_policy(cfg.model, dims, arch=config_arch(cfg))
    policy.set_gradient_checkpointing(args.checkpointing)
    model = torch.compile(policy) if args.compile else policy
    tc = cfg.train
    opt = build_optimizer(build_param_groups(policy, param_info(policy), tc), tc, device)
    loss_fn = ActionTaskLoss(LossConfig(), info.action_dim).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = lambda: autocast(device, precision)  # noqa: E731

    def toolkit_step():
        train_step(model, loss_fn, [batch], opt, scaler, amp, tc.grad_clip)

    # the bare copy waits on the CPU while the toolkit's peak is measured (copied before any step:
    # a trained module can hold non-leaf tensors that deepcopy refuses)
    bare = None if args.no_bare else copy.deepcopy(policy).cpu()
    for _ in range(args.warmup):
        toolkit_step()
    arch = describe(meta_policy(cfg, dims), data_tokens(cfg, dims))
    plan = estimate(arch, setting_from_config(cfg, 1, precision))
    row = {
        "preset": name,
        "compile": args.compile,
        "checkpointing": args.checkpointing,
        "params_m": arch.params / 1e6,
        "batch": args.batch,
        "tokens": arch.tokens["sequence"],
    }
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            toolkit_step()
        sync(device)
        row["peak_mem_gb"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
        row["plan_gb"] = plan.peak / GIB
        row["peak_vs_plan"] = row["peak_mem_gb"] / row["plan_gb"]
    loops = {"toolkit": toolkit_step}
    if bare is not None:
        bare = bare.to(device)
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, fused=True)

        def bare_step():
            bare_opt.zero_grad(set_to_none=True)
            with amp():
                out = bare(batch)
                loss = F.l1_loss(out[K.OUT_ACTION].float(), batch[K.ACTION])
                loss = loss + 0.1 * F.cross_entropy(out[K.OUT_TASK_LOGITS].float(), batch[K.TASK_ID])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
            bare_opt.step()

        for _ in range(args.warmup):
            bare_step()
        loops["bare"] = bare_step
    times = {label: [] for label in loops}
    for _ in range(args.blocks):
        for label, fn in loops.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(device)
            times[label].append((time.perf_counter() - t0) / args.steps)
    row["toolkit_samples_s"] = args.batch / statistics.median(times["toolkit"])
    row["tokens_s"] = row["toolkit_samples_s"] * row["tokens"]
    if "bare" in times:
        row["bare_samples_s"] = args.batch / statistics.median(times["bare"])
        row["ratio"] = row["toolkit_samples_s"] / row["bare_samples_s"]
    if args.profile:
        row["profile"] = profile_steps(toolkit_step, device, Path(args.profile), name)
    if device.type == "cuda":
        flops = step_flops(policy, batch, amp)
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        row["tflop_per_step"] = flops / 1e12
        if peak:
            row["mfu"] = flops * row["toolkit_samples_s"] / args.batch / peak
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny")
    p.add_argument("--vision", default=None, help="timm model name overriding the preset's")
    p.add_argument("--language", default=None, help="HF config dir / hub id overriding the preset's LM")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--instr-tokens", type=int, default=48)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=5, help="alternating timed blocks per loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--optimizer-in-backward", action="store_true", help="step in backward (no clipping)")
    p.add_argument("--compile", action="store_true", help="torch.compile the policy (train.compile)")
    p.add_argument("--profile", default=None, help="dir: profile 3 steps, write the op table, add a summary")
    p.add_argument("--no-bare", action="store_true", help="skip the bare loop (its copy doubles memory)")
    p.add_argument("--out", default="runs/bench/train.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = [bench_preset(name, args, device, precision) for name in args.presets.split(",")]
    header = (
        f"{'preset':<14}{'params(M)':>10}{'tokens':>7}{'toolkit/s':>11}{'tok/s':>10}{'bare/s':>9}{'ratio':>7}"
    )
    if device.type == "cuda":
        header += f"{'peak GiB':>9}{'plan GiB':>9}{'meas/plan':>10}{'TFLOP/step':>11}{'MFU':>7}"
    print(f"device={device} precision={precision} batch={args.batch} image={args.image_size}px")
    print(header)
    for r in rows:
        line = (
            f"{r['preset']:<14}{r['params_m']:>10.2f}{r['tokens']:>7}{r['toolkit_samples_s']:>11.1f}"
            f"{r['tokens_s']:>10.0f}{r.get('bare_samples_s', float('nan')):>9.1f}{r.get('ratio', float('nan')):>7.3f}"
        )
        if device.type == "cuda":
            line += (
                f"{r['peak_mem_gb']:>9.2f}{r['plan_gb']:>9.2f}{r['peak_vs_plan']:>10.3f}"
                f"{r['tflop_per_step']:>11.3f}{r.get('mfu', float('nan')):>7.1%}"
            )
        print(line)
        if "profile" in r:
            prof = r["profile"]
            kinds = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in prof["kernel_s_per_step"].items())
            print(
                f"  profile: {prof['wall_s_per_step'] * 1e3:.1f} ms/step, GPU busy {prof['gpu_busy_share']:.0%}; {kinds}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "torch": torch.__version__,
    }
    out.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
