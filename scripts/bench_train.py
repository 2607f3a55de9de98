#!/usr/bin/env python
"""Training-step throughput: the toolkit's step next to a bare PyTorch loop, same model and batch.

    python scripts/bench_train.py                       # tiny preset, CPU, fp32
    python scripts/bench_train.py --presets tiny,small --device cuda --precision bf16

Both loops train a copy of the same freshly built policy on the same synthetic batch (bench_model's, two cameras): the toolkit's
``train_step`` (parameter groups, combined loss with per-term metrics, autocast, clipping, NaN
check) and a plain ``AdamW`` + L1 loop. Blocks of steps alternate between the two so machine noise
hits both alike; the table reports the median block. On CUDA it also reports MFU (FLOPs counted by
``torch.utils.flop_counter`` for one step / the GPU's dense bf16 peak) and peak memory.
Writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_model import synthetic_batch, synthetic_info  # noqa: E402

from vla_ft import constants as K  # noqa: E402
from vla_ft.config import LossConfig, ModelConfig, TrainConfig  # noqa: E402
from vla_ft.losses import ActionTaskLoss  # noqa: E402
from vla_ft.models import load_vla, param_info  # noqa: E402
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


def step_flops(policy, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = policy(batch)
        out[K.OUT_ACTION].float().abs().mean().backward()
    policy.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_preset(name: str, args, device: torch.device, precision: str) -> dict:
    info = synthetic_info(args.image_size, args.chunk)
    batch = synthetic_batch(info, args.batch, args.instr_tokens, device)
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset=name), info).to(device)
    policy.set_gradient_checkpointing(args.checkpointing)
    bare = copy.deepcopy(policy)
    tc = TrainConfig(lr=1e-4, warmup_steps=0, steps=10**6)
    opt = build_optimizer(build_param_groups(policy, param_info(policy), tc), tc, device)
    loss_fn = ActionTaskLoss(LossConfig(), info.action_dim).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    amp = lambda: autocast(device, precision)  # noqa: E731
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, fused=device.type == "cuda")

    def toolkit_step():
        train_step(policy, loss_fn, [batch], opt, scaler, amp, 1.0)

    def bare_step():
        bare_opt.zero_grad(set_to_none=True)
        with amp():
            out = bare(batch)
            loss = F.l1_loss(out[K.OUT_ACTION].float(), batch[K.ACTION])
            loss = loss + 0.1 * F.cross_entropy(out[K.OUT_TASK_LOGITS].float(), batch[K.TASK_ID])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        bare_opt.step()

    for fn in (toolkit_step, bare_step):
        for _ in range(args.warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {"toolkit": [], "bare": []}
    for _ in range(args.blocks):
        for label, fn in (("toolkit", toolkit_step), ("bare", bare_step)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(device)
            times[label].append((time.perf_counter() - t0) / args.steps)
    row = {
        "preset": name,
        "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
        "batch": args.batch,
        "toolkit_samples_s": args.batch / statistics.median(times["toolkit"]),
        "bare_samples_s": args.batch / statistics.median(times["bare"]),
    }
    row["ratio"] = row["toolkit_samples_s"] / row["bare_samples_s"]
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        flops = step_flops(policy, batch)
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        row["tflop_per_step"] = flops / 1e12
        if peak:
            row["mfu"] = flops * row["toolkit_samples_s"] / args.batch / peak
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny")
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
    p.add_argument("--out", default="runs/bench/train.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    rows = [bench_preset(name, args, device, precision) for name in args.presets.split(",")]
    header = f"{'preset':<14}{'params(M)':>10}{'toolkit/s':>11}{'bare/s':>9}{'ratio':>7}"
    if device.type == "cuda":
        header += f"{'mem(GB)':>9}{'TFLOP/step':>11}{'MFU':>7}"
    print(f"device={device} precision={precision} batch={args.batch} image={args.image_size}px")
    print(header)
    for r in rows:
        line = (
            f"{r['preset']:<14}{r['params_m']:>10.2f}{r['toolkit_samples_s']:>11.1f}"
            f"{r['bare_samples_s']:>9.1f}{r['ratio']:>7.3f}"
        )
        if device.type == "cuda":
            line += f"{r['peak_mem_gb']:>9.2f}{r['tflop_per_step']:>11.3f}{r.get('mfu', float('nan')):>7.1%}"
        print(line)
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
