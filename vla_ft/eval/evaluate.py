"""``evaluate``: score a policy over a fixed, seeded set of simulated episodes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ft.errors import ConfigError, EnvError
from vla_ft.eval.policies import ExpertPolicy, RandomPolicy, check_policy, runs_in_worker
from vla_ft.eval.pool import make_pool
from vla_ft.eval.report import build_manifest, log_wandb, write_reports
from vla_ft.eval.rollout import Rollout
from vla_ft.eval.scoring import EpisodeResult, aggregate
from vla_ft.eval.video import write_video


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


def _env_name(env_cfg: Any) -> str:
    return env_cfg.gym_id if env_cfg.type == "gym" else env_cfg.task


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
    if runs_in_worker(policy) and env_cfg.type == "gym":
        raise EnvError(
            f"--policy expert needs a task of this suite; env.type=gym ({env_cfg.gym_id}) has none"
        )
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
    results depend on neither the worker count nor the backend.

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
        EnvError: the env cannot provide what the policy reads, or a bad env config.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    episodes = int(eval_cfg.episodes)
    if episodes < 1:
        raise ConfigError(f"eval.episodes={episodes}: nothing to evaluate; use 1 or more episodes")
    max_steps = eval_cfg.max_steps if eval_cfg.max_steps is not None else env_cfg.max_steps
    obs_spec = getattr(policy, "obs_spec", None)
    n_slots = min(int(eval_cfg.num_envs), episodes)
    expert = ExpertPolicy() if isinstance(policy, str) and policy == "expert" else None
    expert = policy if runs_in_worker(policy) else expert
    options = {
        "history": int(getattr(obs_spec, "history", 1) or 1),
        "expert": expert,
    }
    if expert is not None and env_cfg.type == "gym":
        raise EnvError(
            f"--policy expert needs a task of this suite; env.type=gym ({env_cfg.gym_id}) has none"
        )
    pool = make_pool(env_cfg, eval_cfg, max_steps, n_slots, options)
    try:
        spec = pool.start()
        policy = _resolve_policy(policy, spec, env_cfg, eval_cfg.seed)
        check_policy(policy, spec, _env_name(env_cfg))
        setup_s = time.perf_counter() - start
        out = Rollout(
            pool, policy, episodes, eval_cfg.seed, n_slots, eval_cfg.replan_every, eval_cfg.temporal_ensemble,
            eval_cfg.video if out_dir is not None else 0,
        ).run()  # fmt: skip
    finally:
        pool.close()
    wall = time.perf_counter() - start
    videos = []
    if out_dir is not None:
        for ep in out.episodes:
            if ep.index in out.videos:
                ep.video = str(write_video(Path(out_dir) / "videos", ep.index, ep.success, ep.instruction,
                                           out.videos[ep.index]))  # fmt: skip
                videos.append(ep.video)
    scores = aggregate(out.episodes)
    policy_name = policy if isinstance(policy, str) else type(policy).__name__
    report = {
        "overall": scores["overall"].to_dict(),
        "per_task": {k: v.to_dict() for k, v in scores["per_task"].items()},
        "per_instruction": {k: v.to_dict() for k, v in scores["per_instruction"].items()},
        "episodes": [e.to_dict() for e in out.episodes],
        "manifest": build_manifest(
            env_cfg, eval_cfg, episodes, policy_name, obs_spec, ckpt, spec["max_steps"]
        ),
        "timing": {
            "wall_s": wall,
            "setup_s": setup_s,
            "rollout_s": wall - setup_s,
            "policy_s": out.policy_s,
            "main_cpu_s": time.process_time() - cpu_start,  # this process: inference, batching, pipes
            "episodes_per_min": 60.0 * episodes / max(wall - setup_s, 1e-9),
            "workers": pool.n_workers,
            "worker_restarts": out.restarts,
            "backend": pool.backend,
            "nodes": sorted({e.node for e in out.episodes if e.node is not None}),
        },
    }
    if out_dir is not None:
        write_reports(report, out_dir)
    log_wandb(report, videos, step=step)
    overall = scores["overall"]
    return EvalResult(
        overall.success_rate, overall.ci95, out.episodes, report, Path(out_dir) if out_dir else None, videos
    )
