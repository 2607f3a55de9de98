"""``evaluate``: score a policy over a fixed, seeded set of simulated episodes.

With ``env.tasks`` one evaluation scores several tasks of this suite: ``eval.episodes`` episodes of
each, every task on the same reset seeds, merged into one report (overall, per task, per
instruction). It runs the tasks one after the other, each as the single-task evaluation of that
task would (its own worker pool, episode ``k * episodes + i`` for task ``k``), rather than mixing
tasks in the workers: every guarantee of the single-task path (results independent of worker count
and backend, crash tolerance, videos) carries over unchanged, a task's episodes are exactly its
single-task evaluation's (a neural policy sees the same batches), and the price is one pool start
per task (about a second locally).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ft.errors import ConfigError, EnvError
from vla_ft.eval.env_check import EnvSpec
from vla_ft.eval.env_match import check_spec, expected_from_policy, fallback_instruction
from vla_ft.eval.policies import ExpertPolicy, RandomPolicy, check_policy, runs_in_worker
from vla_ft.eval.pool import make_pool
from vla_ft.eval.pool_base import slot_count
from vla_ft.eval.report import build_manifest, log_wandb, write_reports
from vla_ft.eval.rollout import Rollout, RolloutOutput
from vla_ft.eval.scoring import EpisodeResult, aggregate
from vla_ft.eval.video import write_video
from vla_ft.sim.env_types import check_expert, env_type


@dataclass
class EvalResult:
    """What an evaluation found.

    Attributes:
        success_rate: successes / episodes.
        ci95: Wilson 95% interval of the success rate.
        episodes: per-episode records, sorted by episode number.
        report: the full ``eval.json`` content (aggregates per task/instruction, manifest, timing).
        out_dir: where reports and videos went (None: nothing written).
        videos: paths of the written mp4 files.
    """

    success_rate: float
    ci95: tuple[float, float]
    episodes: list[EpisodeResult]
    report: dict[str, Any]
    out_dir: Path | None = None
    videos: list[str] = field(default_factory=list)

    @property
    def outcomes(self) -> list[tuple[int, bool, int, str]]:
        """``(index, success, steps, reason)`` per episode: what must match between identical runs."""
        return [(e.index, e.success, e.steps, e.reason) for e in self.episodes]


@dataclass
class _TaskRun:
    """One task's rollouts (a whole evaluation, or one task of a multi-task one)."""

    task: str
    out: RolloutOutput
    spec: dict[str, Any]  # what the workers reported (action dim, keys, max_steps)
    policy: Any  # resolved: "expert" / "random" became their objects
    setup_s: float
    wall_s: float
    workers: int
    backend: str


def _run_task(
    policy: Any, env_cfg: Any, eval_cfg: Any, first_index: int, videos: int, options: dict
) -> _TaskRun:
    """Start a pool for ``env_cfg``'s task, check the policy against it, roll out, close the pool."""
    start = time.perf_counter()
    episodes = int(eval_cfg.episodes)
    max_steps = eval_cfg.max_steps if eval_cfg.max_steps is not None else env_cfg.max_steps
    n_slots = slot_count(eval_cfg)
    kind = env_type(env_cfg)
    pool = make_pool(env_cfg, eval_cfg, max_steps, n_slots, options)
    try:
        spec = pool.start()
        policy = _resolve_policy(policy, spec, env_cfg, eval_cfg.seed)
        check_policy(policy, spec, kind.display_name(env_cfg))
        env = EnvSpec.from_worker(spec, kind.config_name(env_cfg))
        expected = expected_from_policy(policy)  # None: a policy without dims (random, expert)
        instruction = None
        if expected is not None:
            check_spec(env, expected, env_cfg)  # state dims, image layout: before any rollout
            instruction = fallback_instruction(env, env_cfg, expected.instructions)
        setup_s = time.perf_counter() - start
        out = Rollout(
            pool, policy, episodes, eval_cfg.seed, n_slots, eval_cfg.replan_every, eval_cfg.temporal_ensemble,
            videos, first_index=first_index, instruction=instruction,
        ).run()  # fmt: skip
    finally:
        pool.close()
    wall = time.perf_counter() - start
    # an episode lost before its reset replied has no task from the env: one pool runs one task, so
    # it is the others' (else the per-task table would gain a "" row)
    task = next((e.task for e in out.episodes if e.task), kind.display_name(env_cfg))
    for ep in out.episodes:
        ep.task = ep.task or task
    # named as it ran: the configured name, with the task the env reported when that differs
    return _TaskRun(env.label, out, spec, policy, setup_s, wall, pool.n_workers, pool.backend)


def _resolve_policy(policy: Any, spec: dict[str, Any], env_cfg: Any, seed: int) -> Any:
    if isinstance(policy, str):
        if policy == "random":
            return RandomPolicy(
                spec["action_dim"], spec["action_low"], spec["action_high"], chunk=4, seed=seed
            )
        if policy == "expert":
            policy = ExpertPolicy()
        else:
            raise EnvError(f"policy={policy!r} is not a policy object, 'expert' or 'random'")
    if runs_in_worker(policy):
        check_expert(env_cfg)
    return policy


def evaluate(
    policy: Any,
    env_cfg: Any,
    eval_cfg: Any,
    out_dir: str | Path | None = None,
    ckpt: str | Path | None = None,
    step: int | None = None,
) -> EvalResult:
    """Roll ``policy`` out for ``eval_cfg.episodes`` seeded episodes and score them.

    Workers (``eval_cfg.workers`` spawned processes, or Ray actors with ``eval_cfg.backend="ray"``)
    own ``eval_cfg.num_envs`` envs; the policy runs batched in this process and its chunks execute
    open-loop for ``eval_cfg.replan_every`` steps. Episode ``i`` resets with seed ``eval_cfg.seed + i``;
    results depend on neither the worker count nor the backend. With ``env_cfg.tasks`` each task gets
    ``eval_cfg.episodes`` episodes on those seeds, one task after the other (module docstring), and
    the result holds them all: ``success_rate`` is the overall rate, ``report["per_task"]`` each task's.

    Args:
        policy: an object with ``action_dim`` and ``predict_action(obs (N, ...), instructions) -> (N, H, A)``
            (e.g. ``VLAPolicy`` in eval mode), ``"expert"`` (the task's scripted expert, run in the
            workers) or ``"random"`` (uniform actions).
        env_cfg: the ``env`` config section.
        eval_cfg: the ``eval`` config section.
        out_dir: where ``eval.json``, ``eval.md`` and videos go (None: write nothing).
        ckpt: checkpoint directory, hashed into the manifest.
        step: training step for wandb logging (logged only when a wandb run is active).

    Returns:
        The :class:`EvalResult`.

    Raises:
        CheckpointError: the policy's action dimension does not match the env (before any rollout).
        EnvError: the env cannot provide what the policy reads, or a bad env config (an unknown
            name in ``env_cfg.tasks``: before any task runs).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    episodes = int(eval_cfg.episodes)
    if episodes < 1:
        raise ConfigError(f"eval.episodes={episodes}: nothing to evaluate; use 1 or more episodes")
    obs_spec = getattr(policy, "obs_spec", None)
    expert = ExpertPolicy() if isinstance(policy, str) and policy == "expert" else None
    expert = policy if runs_in_worker(policy) else expert
    options = {
        "history": int(getattr(obs_spec, "history", 1) or 1),
        "expert": expert,
    }
    if expert is not None:
        check_expert(env_cfg)
    several = bool(getattr(env_cfg, "tasks", None))
    if several:  # a bad name fails now, not after the tasks before it ran
        env_type(env_cfg).check_names(env_cfg)
    task_cfgs = (
        [dataclasses.replace(env_cfg, task=t, tasks=[]) for t in env_cfg.tasks] if several else [env_cfg]
    )
    n_videos = eval_cfg.video if out_dir is not None else 0
    runs = [
        _run_task(policy, cfg, eval_cfg, k * episodes, n_videos, options) for k, cfg in enumerate(task_cfgs)
    ]
    wall = time.perf_counter() - start
    all_episodes = [ep for run in runs for ep in run.out.episodes]  # indices ascend task by task
    videos = []
    if out_dir is not None:
        for run in runs:
            for ep in run.out.episodes:
                if ep.index in run.out.videos:
                    ep.video = str(write_video(Path(out_dir) / "videos", ep.index, ep.success, ep.instruction,
                                               run.out.videos[ep.index]))  # fmt: skip
                    videos.append(ep.video)
    scores = aggregate(all_episodes)
    resolved = runs[-1].policy
    policy_name = resolved if isinstance(resolved, str) else type(resolved).__name__
    limits = {run.task: run.spec["max_steps"] for run in runs} if len(runs) > 1 else runs[0].spec["max_steps"]
    setup_s = sum(run.setup_s for run in runs)
    report = {
        "overall": scores["overall"].to_dict(),
        "per_task": {k: v.to_dict() for k, v in scores["per_task"].items()},
        "per_instruction": {k: v.to_dict() for k, v in scores["per_instruction"].items()},
        "episodes": [e.to_dict() for e in all_episodes],
        "manifest": build_manifest(
            env_cfg, eval_cfg, episodes, policy_name, obs_spec, ckpt, limits, [run.task for run in runs]
        ),
        "timing": {
            "wall_s": wall,
            "setup_s": setup_s,  # every task's pool start and policy check
            "rollout_s": wall - setup_s,
            "policy_s": sum(run.out.policy_s for run in runs),
            "main_cpu_s": time.process_time() - cpu_start,  # this process: inference, batching, pipes
            "episodes_per_min": 60.0 * len(all_episodes) / max(wall - setup_s, 1e-9),
            "per_task_s": {run.task: run.wall_s for run in runs},
            "workers": runs[0].workers,
            "worker_restarts": sum(run.out.restarts for run in runs),
            "backend": runs[0].backend,
            "nodes": sorted({e.node for e in all_episodes if e.node is not None}),
        },
    }
    if out_dir is not None:
        write_reports(report, out_dir)
    log_wandb(report, videos, step=step)
    overall = scores["overall"]
    return EvalResult(
        overall.success_rate, overall.ci95, all_episodes, report, Path(out_dir) if out_dir else None, videos
    )
