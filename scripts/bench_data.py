#!/usr/bin/env python
"""Data pipeline benchmark: samples/s per cache mode and worker count, normalizer statistics time,
and the share of a training step spent waiting for data (default `tiny` model, batch 64).

    python scripts/bench_data.py                       # 200 demos x 150 steps, two 96 px cameras
    python scripts/bench_data.py --demos 20 --quick    # smoke run
    python scripts/bench_data.py --lerobot ROOT        # + LeRobotDataset v3 rows: ROOT read directly
                                                       #   vs. the same data converted to HDF5

The generated file is written once with vla_ft.data.writer (our collection layout) and reused.
Prints a table and writes JSON to --out. Numbers depend on machine load: say where they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from vla_ft.config import AugmentConfig, DataConfig, LossConfig, ModelConfig  # noqa: E402
from vla_ft.data.augment import Augmenter  # noqa: E402
from vla_ft.data.dataset import build_datasets  # noqa: E402
from vla_ft.data.normalize import Normalizer  # noqa: E402


def synth_episode(rng: np.random.Generator, steps: int, size: int) -> dict[str, np.ndarray]:
    """Smooth images with a moving square (gzip ratio close to rendered scenes), random-walk proprio."""
    yy, xx = np.mgrid[:size, :size]
    base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 90)], -1).astype(np.uint8)
    imgs = {}
    for cam in ("agentview_image", "wrist_image"):
        frames = np.repeat(base[None], steps, 0)
        c = rng.integers(10, size - 20, 2)
        for t in range(steps):
            y, x = (c + t // 10) % (size - 12)
            frames[t, y : y + 12, x : x + 12] = (200, 40, 40)
        imgs[cam] = frames
    ee = np.cumsum(rng.normal(0, 0.01, (steps, 3)), 0).astype(np.float32)
    grip = np.repeat(rng.uniform(0, 0.04, (steps, 1)), 2, 1).astype(np.float32)
    act = np.clip(rng.normal(0, 0.5, (steps, 4)), -1, 1).astype(np.float32)
    return {**imgs, "ee_pos": ee, "gripper_qpos": grip, "actions": act}


def make_file(path: Path, demos: int, steps: int, size: int) -> Path:
    from vla_ft.data.writer import DemoWriter

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with DemoWriter(
        path, {"env_name": "bench"}, {"language_instruction": "put the red cube in the bowl"}
    ) as w:
        for i in range(demos):
            ep = synth_episode(rng, steps, size)
            act = ep.pop("actions")
            color = ("red", "blue", "green")[i % 3]
            attrs = {
                "language_instruction": f"put the {color} cube in the bowl",
                "task": "pick_place",
                "seed": i,
            }
            w.add_demo(
                ep, act, np.zeros(steps, np.float32), np.zeros(steps, np.uint8), np.zeros((steps, 8)), attrs
            )
        w.close(valid_fraction=0.1)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return path


def bench_stats(frames: int) -> float:
    rng = np.random.default_rng(0)
    action, state = (
        rng.normal(size=(frames, 7)).astype(np.float32),
        rng.normal(size=(frames, 9)).astype(np.float32),
    )
    t0 = time.perf_counter()
    Normalizer.from_arrays("quantile", action, state)
    return time.perf_counter() - t0


def loader_for(ds, batch: int, workers: int, seed: int = 0) -> DataLoader:
    kw = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
    sampler = ds.make_sampler(seed)
    return DataLoader(
        ds, batch, sampler=sampler, num_workers=workers, drop_last=True, collate_fn=ds.collate_fn, **kw
    )


def bench_loader(ds, batch: int, workers: int, batches: int) -> float:
    it = iter(loader_for(ds, batch, workers))
    next(it)  # worker start-up and first fetch are not counted
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


def make_step(info, batch: int):
    """One full training step of the default (`tiny`) model, or a stand-in CNN if models is absent."""
    try:
        from vla_ft.losses import ActionTaskLoss
        from vla_ft.models import load_vla

        model = load_vla(ModelConfig(preset="tiny"), info)
        loss_fn = ActionTaskLoss(LossConfig(), info.action_dim)
        name = "vla_ft.models tiny preset + ActionTaskLoss"
    except ImportError as exc:  # the model package has not landed: say so in the output
        from vla_ft.constants import ACTION, IMAGES

        model = torch.nn.Sequential(
            torch.nn.Conv2d(6, 32, 5, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        name = f"stand-in CNN ({exc})"

        def loss_fn(out, b):
            return (out.mean() - b[ACTION].mean()) ** 2, {}

        model.forward_orig = model.forward
        model.forward = lambda b: model.forward_orig(b[IMAGES][:, -1].flatten(1, 2).float())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aug = Augmenter(AugmentConfig())
    gen = torch.Generator().manual_seed(0)

    def step(b):
        loss, _ = loss_fn(model(aug(b, gen)), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, name


def bench_wait(ds, step, batch: int, workers: int, steps: int) -> dict[str, float]:
    return time_wait(iter(loader_for(ds, batch, workers, seed=1)), step, steps)


def time_wait(it, step, steps: int) -> dict[str, float]:
    """Time ``steps`` training steps fed by ``it``: the share of the step spent waiting for data."""
    step(next(it))  # warm-up
    wait = compute = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        t1 = time.perf_counter()
        step(b)
        t2 = time.perf_counter()
        wait, compute = wait + (t1 - t0), compute + (t2 - t1)
    return {
        "step_ms": 1e3 * (wait + compute) / steps,
        "wait_ms": 1e3 * wait / steps,
        "wait_share": wait / (wait + compute),
    }


def _drawn_loader(ds, batch: int, workers: int, n_batches: int) -> DataLoader:
    """Batches drawn with replacement (a dataset smaller than the run is reused across epochs)."""
    g = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=batch * n_batches, generator=g)
    return DataLoader(
        ds, batch, sampler=sampler, num_workers=workers, drop_last=True, collate_fn=ds.collate_fn
    )


def bench_lerobot(root: str, out_dir: Path, tok, batch: int, workers: int, batches: int, steps: int) -> dict:
    """The v3 reader vs. our HDF5 reader on the same data (ROOT converted once), RAM-cached and lazy,
    plus the data wait of `tiny` training steps on the v3 root (RAM-cached)."""
    from vla_ft.data.lerobot import convert_to_hdf5

    h5 = convert_to_hdf5(root, out_dir / f"{Path(root).name}_converted.hdf5")
    rows = []
    for source, path in (("v3", root), ("hdf5", str(h5))):
        for cache in ("ram", "lazy"):
            t0 = time.perf_counter()
            cfg = DataConfig(paths=[path], cache_images=cache, split="random", val_fraction=0.0)
            train, _, info = build_datasets(cfg, tok, seed=0)
            build_s = time.perf_counter() - t0
            it = iter(_drawn_loader(train, batch, workers, batches + 1))
            next(it)  # worker start-up and first fetch are not counted
            t0 = time.perf_counter()
            for _ in it:
                pass
            sps = batches * batch / (time.perf_counter() - t0)
            rows.append({"source": source, "cache": cache, "build_s": build_s, "samples_per_s": sps})
    cfg = DataConfig(paths=[root], cache_images="ram", split="random", val_fraction=0.0)
    train, _, info = build_datasets(cfg, tok, seed=0)
    step, _ = make_step(info, batch)
    train_wait = time_wait(iter(_drawn_loader(train, batch, workers, steps + 1)), step, steps)
    return {"root": root, "workers": workers, "batch": batch, "rows": rows, "train_wait": train_wait}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demos", type=int, default=200)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="batches timed per loader setting")
    p.add_argument("--train-steps", type=int, default=20, help="training steps timed per worker count")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--stats-frames", type=int, default=1_000_000)
    p.add_argument("--file", default=None, help="HDF5 file to use (default: generated under runs/bench/)")
    p.add_argument("--out", default="runs/bench/data.json")
    p.add_argument("--quick", action="store_true", help="few batches, for a smoke run")
    p.add_argument(
        "--lerobot", default=None, help="LeRobotDataset v3 root: add v3 rows (vs. the same data as HDF5)"
    )
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.train_steps, a.stats_frames = 3, 3, 100_000
    torch.manual_seed(0)
    out_dir = Path(a.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (
        Path(a.file)
        if a.file
        else make_file(out_dir / f"bench_{a.demos}x{a.steps}_{a.size}px.hdf5", a.demos, a.steps, a.size)
    )
    from vla_ft.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    workers = [int(w) for w in a.workers.split(",")]
    res: dict = {
        "file": str(path),
        "batch": a.batch,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    res["stats_s"] = {"frames": a.stats_frames, "seconds": bench_stats(a.stats_frames)}
    rows = []
    for cache in ("ram", "lazy"):
        t0 = time.perf_counter()
        train, _, info = build_datasets(DataConfig(paths=[str(path)], cache_images=cache), tok, seed=0)
        build_s = time.perf_counter() - t0
        for w in workers:
            rows.append(
                {
                    "cache": cache,
                    "workers": w,
                    "build_s": build_s,
                    "samples_per_s": bench_loader(train, a.batch, w, a.batches),
                }
            )
    res["loader"] = rows
    train, _, info = build_datasets(DataConfig(paths=[str(path)]), tok, seed=0)  # default: auto cache
    step, res["model"] = make_step(info, a.batch)
    res["train_wait"] = [
        {"workers": w, **bench_wait(train, step, a.batch, w, a.train_steps)} for w in workers
    ]
    print(f"\nfile {path}  ({info.num_train_samples} train samples, {info.image_size} px, batch {a.batch})")
    print(f"normalizer stats on {a.stats_frames:,} frames (7 + 9 dims): {res['stats_s']['seconds']:.2f} s")
    print(f"\n{'cache':>6} {'workers':>7} {'build s':>8} {'samples/s':>10}")
    for r in rows:
        print(f"{r['cache']:>6} {r['workers']:>7} {r['build_s']:>8.1f} {r['samples_per_s']:>10.0f}")
    print(f"\ntraining step: {res['model']}, images cached={train.image_cache is not None}")
    print(f"{'workers':>7} {'step ms':>8} {'wait ms':>8} {'wait %':>7}")
    for r in res["train_wait"]:
        print(f"{r['workers']:>7} {r['step_ms']:>8.1f} {r['wait_ms']:>8.2f} {100 * r['wait_share']:>6.1f}%")
    if a.lerobot:
        lr = res["lerobot"] = bench_lerobot(
            a.lerobot, out_dir, tok, a.batch, workers[0], a.batches, a.train_steps
        )
        print(f"\nLeRobotDataset v3 {a.lerobot} vs. the same data as HDF5 ({lr['workers']} workers)")
        print(f"{'source':>6} {'cache':>6} {'build s':>8} {'samples/s':>10}")
        for r in lr["rows"]:
            print(f"{r['source']:>6} {r['cache']:>6} {r['build_s']:>8.2f} {r['samples_per_s']:>10.0f}")
        w = lr["train_wait"]
        print(f"v3 (RAM-cached) training step {w['step_ms']:.1f} ms, data wait {100 * w['wait_share']:.1f}%")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {a.out}")
    return res


if __name__ == "__main__":
    main()
