"""Success scoring: per-episode records, the Wilson score interval and aggregation.

Everything here is pure Python on plain records so that it can be tested without a simulator.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

# Why an episode ended. "success" is the only non-failure.
REASON_SUCCESS = "success"
REASON_TIMEOUT = "timeout"  # max_steps reached (or the env truncated the episode)
REASON_PHYSICS = "physics_error"  # the simulator reported an unstable state (info["physics_error"])
REASON_TERMINATED = "terminated"  # the env ended the episode without success (e.g. the pole fell)
REASON_CRASH = "worker_crash"  # the worker process died or stopped answering
REASONS = (REASON_SUCCESS, REASON_TIMEOUT, REASON_PHYSICS, REASON_TERMINATED, REASON_CRASH)


@dataclass
class EpisodeResult:
    """The outcome of one evaluation episode.

    Attributes:
        index: episode number in ``0 .. episodes-1``; it fixes the reset seed. With several tasks
            (``env.tasks``) task ``k``'s episode ``i`` is number ``k * episodes + i``.
        seed: the seed given to ``env.reset(seed=...)`` (``eval.seed + i``: the same seeds for every task).
        task: task name (an episode lost before its reset replied: the task its pool ran).
        instruction: the language instruction the policy received ("" if unknown, e.g. a crash
            before reset finished).
        success: True when the task's success predicate held.
        steps: environment steps executed (to success, or until the episode ended).
        reason: one of :data:`REASONS`.
        video: path of the saved video, when one was written.
        events: the task's events (``envs.tasks.Task.events``: ``grasped``, ``grasped_other``,
            ``over_destination``, ...) -> the first step (1-based) at which each held, None when it
            never did; empty for envs that report none (gymnasium ids) and crashed episodes.
        node: the Ray node the episode ran on, ``"<ip> (<node id>)"`` (``eval.backend: ray``; None:
            the local pool on this machine).
    """

    index: int
    seed: int
    task: str
    instruction: str
    success: bool
    steps: int
    reason: str
    video: str | None = None
    events: dict[str, int | None] = field(default_factory=dict)
    node: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n.

    Args:
        successes: number of successes k, ``0 <= k <= n``.
        n: number of trials; ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
        z: standard-normal quantile of the two-sided level (1.96 for 95%).

    Returns:
        ``(low, high)``.
    """
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes={successes} must lie in [0, n={n}]")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the ends: center - half at k=0 is 0 only up to rounding (3.5e-18 for 0 of 100), which
    # would put the lower bound above the rate (a negative error bar in a plot)
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


@dataclass
class GroupScore:
    """Success statistics of a group of episodes (all, one task, or one instruction)."""

    episodes: int
    successes: int
    success_rate: float
    ci95: tuple[float, float]
    mean_steps_to_success: float | None  # None when nothing succeeded
    failure_reasons: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # event -> episodes in which it happened

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        return out


def score_group(episodes: list[EpisodeResult]) -> GroupScore:
    """Success rate, Wilson 95% interval, mean steps to success, failure reason and event counts."""
    n = len(episodes)
    wins = [e for e in episodes if e.success]
    reasons = Counter(e.reason for e in episodes if not e.success)
    events: dict[str, int] = {}
    for e in episodes:
        for name, first in e.events.items():
            events[name] = events.get(name, 0) + (first is not None)
    return GroupScore(
        episodes=n,
        successes=len(wins),
        success_rate=len(wins) / n if n else 0.0,
        ci95=wilson_interval(len(wins), n),
        mean_steps_to_success=(sum(e.steps for e in wins) / len(wins)) if wins else None,
        failure_reasons=dict(sorted(reasons.items())),
        events=events,
    )


def aggregate(episodes: list[EpisodeResult]) -> dict[str, Any]:
    """Scores overall, per task and per instruction.

    Returns:
        ``{"overall": GroupScore, "per_task": {task: GroupScore}, "per_instruction": {text: GroupScore}}``
        (groups sorted by name).
    """
    by_task: dict[str, list[EpisodeResult]] = defaultdict(list)
    by_instr: dict[str, list[EpisodeResult]] = defaultdict(list)
    for ep in episodes:
        by_task[ep.task].append(ep)
        by_instr[ep.instruction].append(ep)
    return {
        "overall": score_group(episodes),
        "per_task": {k: score_group(v) for k, v in sorted(by_task.items())},
        "per_instruction": {k: score_group(v) for k, v in sorted(by_instr.items())},
    }
