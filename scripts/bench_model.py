#!/usr/bin/env python
"""Model speed per preset: parameters, fwd+bwd+AdamW ms/step, inference actions/s.

    python scripts/bench_model.py                                  # tiny, tiny-vlm, small on CPU
    python scripts/bench_model.py --presets tiny --batch 64 --size 64
    python scripts/bench_model.py --device cuda --presets tiny,small,smolvlm-256m --precision bf16

Synthetic batch: B x (history 1, 2 cameras, 3, size, size) uint8 images, 5-dim state,
``--instr-tokens`` instruction tokens (48: a typical instruction in byte-level tokens), chunk 4,
action dim 4. ``step_ms`` is the median of ``--steps`` timed training steps (L1 + task loss, AdamW)
after 2 warm-up steps; ``infer_ms`` is the median latency of ``predict_action`` on
one observation (one chunk), and ``actions_per_s`` = chunk / infer latency (the queue executes the
whole chunk). Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vla_ft import constants as C  # noqa: E402
from vla_ft.config import ModelConfig  # noqa: E402
from vla_ft.data.normalize import Normalizer  # noqa: E402
from vla_ft.models import count_parameters, load_vla  # noqa: E402


def synthetic_info(size: int, chunk: int) -> SimpleNamespace:
    """Dims of a two-camera, 4-dim-action task (also used by bench_train.py)."""
    rng = np.random.default_rng(0)
    norm = Normalizer.from_arrays("min_max", rng.uniform(-1, 1, (64, 4)), rng.normal(size=(64, 5)))
    return SimpleNamespace(
        action_dim=4,
        state_dim=5,
        image_keys=["agentview_image", "wrist_image"],
        state_keys=["ee_pos", "gripper_qpos"],
        image_size=(size, size),
        history=1,
        chunk=chunk,
        task_names=["pick_place", "stack"],
        normalizer=norm,
    )


def synthetic_batch(
    info: SimpleNamespace, b: int, n_tok: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """A random training batch in the batch vocabulary (also used by bench_train.py)."""
    h, w = info.image_size
    batch = {
        C.IMAGES: torch.randint(0, 256, (b, 1, 2, 3, h, w), dtype=torch.uint8),
        C.STATE: torch.randn(b, 1, info.state_dim),
        C.INSTR_IDS: torch.randint(3, 259, (b, n_tok)),
        C.INSTR_MASK: torch.ones(b, n_tok, dtype=torch.long),
        C.ACTION: torch.rand(b, info.chunk, 4) * 2 - 1,
        C.ACTION_IS_PAD: torch.zeros(b, info.chunk, dtype=torch.bool),
        C.TASK_ID: torch.randint(0, 2, (b,)),
        C.PROGRESS: torch.rand(b),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    info = synthetic_info(args.size, args.chunk)
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset=name), info).to(device)
    trainable, total = count_parameters(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = synthetic_batch(info, args.batch, args.instr_tokens, device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    times = []
    policy.train()
    for i in range(args.steps + 2):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = policy(batch)
            loss = (out[C.OUT_ACTION] - batch[C.ACTION]).abs().mean()
            loss = loss + 0.1 * F.cross_entropy(out[C.OUT_TASK_LOGITS], batch[C.TASK_ID])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    rng = np.random.default_rng(0)
    obs = {k: rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for k in info.image_keys}
    obs.update(ee_pos=np.zeros(3, np.float32), gripper_qpos=np.zeros(2, np.float32))
    infer = []
    for i in range(args.infer_calls + 2):
        _sync(device)
        t = time.perf_counter()
        policy.predict_action(obs, "pick up the red cube and place it on the plate")
        _sync(device)
        if i >= 2:
            infer.append(time.perf_counter() - t)
    step_ms = 1000 * statistics.median(times)
    infer_ms = 1000 * statistics.median(infer)
    row = {
        "preset": name,
        "params": total,
        "trainable": trainable,
        "batch": args.batch,
        "size": args.size,
        "step_ms": round(step_ms, 1),
        "steps_per_s": round(1000 / step_ms, 2),
        "infer_ms": round(infer_ms, 1),
        "actions_per_s": round(args.chunk * 1000 / infer_ms, 1),
    }
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,tiny-vlm,small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--instr-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--infer-calls", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/bench/model.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench_preset(name, args, device) for name in args.presets.split(",")]
    cols = list(rows[0])
    print(" | ".join(f"{c:>12}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r.get(c, ''):>12}" for c in cols))
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "precision": args.precision,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"load average {meta['load_avg']}; wrote {out}")


if __name__ == "__main__":
    main()
