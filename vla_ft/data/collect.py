"""Scripted-expert demo collection: ``run_collect(cfg)`` (``scripts/collect_demos.py``), and
``ensure_data(cfg)``: a run's demos, collected first when missing and allowed.

What is collected comes from the env type's record (vla_ft/sim/env_types.py): this suite's
``collect.tasks``, or the one env of robosuite or of a Meta-World gym id. Episode ``i`` of task ``t`` resets with seed
``cfg.collect.seed + TASK_SEED_STRIDE * index(t) + i`` (``index`` in ``envs.list_tasks()``, so a
task's seeds do not depend on the task list; robosuite: ``cfg.collect.seed + i``). Attempts run
in a ``spawn`` process pool (forking after an EGL context exists hangs) in seed order; the first
``cfg.collect.episodes`` successful episodes per task (or all, with ``keep_failures``) are written,
so the file does not depend on the number of workers. ``collect.goals: seen`` builds the envs with
``goals="seen"``: no demo is one of a task's held-out combinations (envs/tasks.py), and
``env_args.env_kwargs.goals`` in the file says so. Demos always use the training wordings. No torch
import here.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import multiprocessing as mp
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

from vla_ft.config import Config
from vla_ft.data.lerobot import is_lerobot_path
from vla_ft.data.writer import DemoWriter
from vla_ft.errors import DataError, suite_errors
from vla_ft.sim.env_types import CollectEnv, CollectTask, env_type

TASK_SEED_STRIDE = 1_000_000
_ENVS: dict[CollectEnv, Any] = {}  # per-process env cache (worker processes keep their envs)


def attempt_seed(base_seed: int, seed_slot: int, i: int) -> int:
    """Reset seed of attempt ``i`` of the task in ``seed_slot`` (:class:`CollectTask`)."""
    return base_seed + TASK_SEED_STRIDE * seed_slot + i


def episode_seed(base_seed: int, task: str, i: int) -> int:
    """Reset seed of attempt ``i`` of this suite's ``task``."""
    import envs

    return attempt_seed(base_seed, envs.list_tasks().index(task), i)


class EpisodeJob(NamedTuple):
    """One collection attempt, as the process pool sends it to a worker.

    Attributes:
        env: the env to run it in (a worker builds it once and keeps it).
        seed: the reset seed; the expert's noise is seeded with it too.
        noise: Gaussian noise std of the expert's actions (``collect.action_noise``).
        post: steps recorded after a success (``collect.post_success_steps``).
    """

    env: CollectEnv
    seed: int
    noise: float = 0.0
    post: int = 0


def run_episode(job: EpisodeJob) -> dict[str, Any]:
    """Roll the expert of ``job.env``'s type out once.

    After a success the expert keeps acting for ``job.post`` more steps (recorded; ``success`` stays
    the outcome of the episode proper), so a demo shows what follows the success step (pick_place:
    the gripper opening over the bowl and the hand rising).

    Returns:
        dict with ``obs`` (key -> (T, ...)), ``actions`` (T, 4), ``rewards`` (T,), ``dones`` (T,),
        ``states`` (T, S), ``targets`` (image key -> (T, 2, 2), ``env.target_uv``), ``success``,
        ``instruction``, ``task``, ``seed``, ``physics_error``.
    """
    kind = env_type(job.env)
    if job.env not in _ENVS:
        _ENVS[job.env] = kind.make_collect_env(job.env)
    env = _ENVS[job.env]
    seed, post = job.seed, job.post
    expert = kind.make_expert(env, noise=job.noise, seed=seed)
    obs, info = env.reset(seed=seed)
    expert.reset()
    frames: dict[str, list] = {k: [] for k in obs}
    targets: dict[str, list] = collections.defaultdict(list)
    actions, rewards, states = [], [], []
    done, extra, outcome = False, 0, None
    while not done:
        states.append(env.get_state())
        for k, v in obs.items():
            frames[k].append(v)
        for k, v in env.target_uv().items():
            targets[k].append(v)
        action = expert.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        # a success ends the episode as in evaluation, also where the env keeps going (Meta-World)
        if outcome is None and (terminated or truncated or info["is_success"]):
            outcome = info
        if outcome is not None:  # past a success the env keeps stepping: record `post` more steps
            done = not outcome["is_success"] or extra == post or info["physics_error"]
            extra += 1
    dones = np.zeros(len(actions), dtype=np.uint8)
    dones[-1] = 1
    return {
        "obs": {k: np.stack(v) for k, v in frames.items()},
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "dones": dones,
        "states": np.stack(states),
        "targets": {k: np.stack(v) for k, v in targets.items()},
        "success": bool(outcome["is_success"]) and not info["physics_error"],
        "physics_error": bool(info["physics_error"]),
        "instruction": info["instruction"],
        "task": info.get("task", job.env.task),
        "seed": int(seed),
        # per-demo attributes the env adds (robosuite: the MuJoCo XML robomimic's playback resets to)
        "attrs": kind.demo_attrs(env),
    }


def _close_envs() -> None:
    while _ENVS:
        _ENVS.popitem()[1].close()


def _results(jobs: list[EpisodeJob], workers: int) -> Iterator[dict[str, Any]]:
    """Episode results in job order (inline for one worker, else a spawn process pool).

    At most ``2 * workers`` episodes are in flight; when the caller stops early (enough successes),
    the pool cancels the rest and shuts down cleanly, waiting only for the running ones. Not
    ``multiprocessing.Pool`` with ``terminate()`` on early exit: terminate can kill a worker while it
    holds the task queue's lock, a known deadlock (docs/traps.md).
    """
    if workers == 1:
        try:
            yield from map(run_episode, jobs)
        finally:
            _close_envs()
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        todo = iter(jobs)
        running = collections.deque(pool.submit(run_episode, j) for j in itertools.islice(todo, 2 * workers))
        try:
            while running:
                result = running.popleft().result()  # a crashed worker raises BrokenProcessPool
                nxt = next(todo, None)
                if nxt is not None:
                    running.append(pool.submit(run_episode, nxt))
                yield result
        finally:
            for fut in running:
                fut.cancel()


def _collect_task(plan: CollectTask, cfg: Config, writer: DemoWriter, instructions: list[str]) -> int:
    """Write ``cfg.collect.episodes_for(task)`` episodes of ``plan``'s task (appending to ``instructions``);
    returns attempts."""
    c, task = cfg.collect, plan.env.task
    wanted = c.episodes_for(task)
    attempts = math.ceil(wanted * c.max_attempts_factor)
    jobs = [
        EpisodeJob(plan.env, attempt_seed(c.seed, plan.seed_slot, i), c.action_noise, c.post_success_steps)
        for i in range(attempts)
    ]
    kept = tried = 0
    with tqdm(total=wanted, desc=f"collect {task}", unit="demo") as bar:
        for ep in _results(jobs, min(c.workers, attempts)):
            tried += 1
            if ep["success"] or c.keep_failures:
                attrs = {"language_instruction": ep["instruction"], "task": task, "seed": ep["seed"]}
                attrs["success"] = ep["success"]
                attrs.update(ep.get("attrs", {}))
                writer.add_demo(
                    ep["obs"], ep["actions"], ep["rewards"], ep["dones"], ep["states"], attrs, ep["targets"]
                )
                instructions.append(ep["instruction"])
                kept += 1
                bar.update(1)
            bar.set_postfix(attempts=tried)
            if kept == wanted:
                return tried
    raise DataError(
        f"task '{task}': only {kept}/{wanted} successful episodes in {attempts} attempts; raise "
        f"collect.max_attempts_factor (now {c.max_attempts_factor}) or lower collect.action_noise "
        f"(now {c.action_noise})"
    )


def warn_stale_env(paths: list[str]) -> list[str]:
    """Warn about our own demo files recorded by an older version of envs/ (returns those paths).

    ``collect_if_missing`` reuses an existing file, so a checkout updated after its demos were
    collected silently trains on the old environment (e.g. ENV_VERSION 0.1: the hand started at the
    table centre, which teaches policies to keep going instead of finding the target).
    """
    from envs.env import ENV_VERSION

    stale = []
    for p in paths:
        try:
            with h5py.File(p, "r") as f:
                args = json.loads(f["data"].attrs.get("env_args", "{}"))
        except (OSError, KeyError, ValueError, TypeError):
            continue  # not readable as our layout: the dataset reader reports it with file and key
        if not isinstance(args, dict) or args.get("type") != "vla_ft":
            continue  # not collected by envs/ (robomimic, LIBERO, ...): no version to compare
        version = args.get("env_version")
        if version != ENV_VERSION:
            stale.append(p)
            print(
                f"[vla-ft] warning: {p} was collected with env_version {version}, the environment is now "
                f"{ENV_VERSION} (envs/env.py says what changed); delete it to re-collect",
                file=sys.stderr,
            )
    return stale


def missing_data(paths: list[str]) -> list[str]:
    """The demo files of ``paths`` that do not exist (a LeRobotDataset root or hub id is read as it
    is, never collected, so it is never missing here)."""
    return [p for p in paths if not Path(p).is_file() and not is_lerobot_path(p)]


def ensure_data(cfg: Config) -> None:
    """Collect the configured demos when missing and allowed; else name the exact command."""
    missing = missing_data(cfg.data.paths)
    warn_stale_env([p for p in cfg.data.paths if p not in missing])
    if not missing:
        return
    if cfg.data.collect_if_missing and missing == [cfg.data.paths[0]]:
        c = cfg.collect
        counts = ", ".join(f"{c.episodes_for(t)} of {t}" for t in c.tasks) if c.episodes_per_task else None
        print(f"[vla-ft] {missing[0]} not found: collecting {counts or f'{c.episodes} demos per task'} first")
        run_collect(cfg)
        return
    raise DataError(
        f"dataset file {missing[0]} not found. Collect it with: python scripts/collect_demos.py "
        f"--cfg <your config> collect.output={missing[0]}  (or set data.collect_if_missing=true)"
    )


def run_collect(cfg: Config) -> Path:
    """Collect demos for every task of the env type's plan (this suite: ``cfg.collect.tasks``;
    robosuite: its one env) into ``cfg.collect.output``.

    Returns:
        The path of the published HDF5 file.
    """
    with suite_errors():  # the suite's own errors (unknown task, bad option) as vla_ft's EnvError
        plan = env_type(cfg.env).collect_plan(cfg)
        out = Path(cfg.collect.output)
        tasks = [task.env.task for task in plan.tasks]
        problem = {"language_instruction": "", "tasks": tasks, "language_instructions": []}
        writer = DemoWriter(out, plan.env_args, problem)
        if plan.obs_keys is not None:
            writer.set_obs_keys(plan.obs_keys)
        instructions: list[str] = []
        with writer:
            for task in plan.tasks:
                _collect_task(task, cfg, writer, instructions)
            problem["language_instruction"] = instructions[0]
            problem["language_instructions"] = sorted(set(instructions))
            writer.set_problem_info(problem)
            path = writer.close(valid_fraction=cfg.collect.valid_fraction, seed=cfg.collect.seed)
    print(f"wrote {len(writer.names)} demos ({writer.total} steps) to {path}")
    return path
