#!/usr/bin/env python
"""Env speed: ``TabletopEnv.step`` (physics + cameras + obs/success logic) next to raw
``mujoco.mj_step`` + render of the same scene in the same process, and the wrapper's overhead.

    python scripts/bench_env.py                      # pick_place, 64 px, agentview + wrist
    python scripts/bench_env.py --task stack --image-size 128 --steps 2000

The env and the raw loop run in alternating blocks of ``--block`` steps on two copies of the scene
with the same actions, so load changes on a shared machine hit both alike. Prints a table and writes
JSON to --out. Numbers depend on machine load: say where they came from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import envs  # noqa: E402  (chooses the GL backend; mujoco is imported after it)
from envs.scene import WORKSPACE_HI, WORKSPACE_LO  # noqa: E402


class RawLoop:
    """The env's physics + render work driven directly through mujoco (no wrapper logic)."""

    def __init__(self, env, cameras: tuple[str, ...], render: bool) -> None:
        import mujoco

        self.mj, self.env, self.cameras = mujoco, env, cameras
        self.sim = env.unwrapped.sim
        self.renderer = None
        if render:
            self.renderer = mujoco.Renderer(self.sim.model, env.image_size, env.image_size)
            self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False

    def step(self, a: np.ndarray) -> None:
        sim, env = self.sim, self.env
        target = sim.data.site_xpos[sim.tcp_site] + a[:3] * env.action_scale
        sim.data.mocap_pos[sim.mocap_id] = np.clip(target, WORKSPACE_LO, WORKSPACE_HI)
        sim.data.ctrl[:] = 0.025 * (1.0 - a[3])
        self.mj.mj_step(sim.model, sim.data, nstep=env.n_substeps)
        if self.renderer is not None:
            for cam in self.cameras:
                self.renderer.update_scene(sim.data, camera=cam)
                self.renderer.render()

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()


def compare(task: str, image_size: int, render: bool, actions: np.ndarray, block: int) -> dict[str, float]:
    """Seconds per step of the env and of the raw loop, interleaved in blocks (resets excluded)."""
    env = envs.make(task, image_size=image_size, render=render)
    raw_env = envs.make(task, image_size=image_size, render=False)
    raw = RawLoop(raw_env, env.cameras, render)  # same scene, its own renderer
    env.reset(seed=0)
    raw_env.reset(seed=0)
    t_env = t_raw = 0.0
    for start in range(0, len(actions), block):
        chunk = actions[start : start + block]
        t0 = time.perf_counter()
        for a in chunk:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                t1 = time.perf_counter()
                env.reset(seed=0)
                t0 += time.perf_counter() - t1
        t_env += time.perf_counter() - t0
        t0 = time.perf_counter()
        for a in chunk:
            raw.step(a)
        t_raw += time.perf_counter() - t0
        raw_env.reset(seed=0)
    raw.close()
    env.close()
    raw_env.close()
    return {
        "env_steps_per_s": len(actions) / t_env,
        "raw_steps_per_s": len(actions) / t_raw,
        "overhead_pct": 100.0 * (t_env - t_raw) / t_raw,
        "substeps": env.n_substeps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="pick_place")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--block", type=int, default=50, help="steps per alternating block")
    p.add_argument("--out", default="runs/bench/env.json")
    args = p.parse_args()

    actions = np.random.default_rng(0).uniform(-1, 1, size=(args.steps, 4)).astype(np.float32)
    rows = {
        f"{args.image_size}px, 2 cameras": compare(args.task, args.image_size, True, actions, args.block),
        "no rendering": compare(args.task, args.image_size, False, actions, args.block),
    }
    print(
        f"task={args.task} steps={args.steps} (interleaved blocks of {args.block}); 1 step = 1 control step"
    )
    print(f"{'setting':<22}{'env steps/s':>14}{'raw steps/s':>14}{'overhead':>11}")
    for tag, r in rows.items():
        print(
            f"{tag:<22}{r['env_steps_per_s']:>14.0f}{r['raw_steps_per_s']:>14.0f}{r['overhead_pct']:>10.1f}%"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"task": args.task, "image_size": args.image_size, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
