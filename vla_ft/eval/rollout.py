"""The evaluation loop: deterministic episode scheduling over worker slots, batched inference.

Episode ``i`` resets with seed ``eval.seed + i`` (numbered ``first_index + i`` for the tasks after
the first of a multi-task evaluation). Free slots are filled in slot order with the lowest pending
episode numbers, and every round (reset free slots -> one batched
``predict_action`` over the active slots in slot order -> every worker executes its chunks) runs
in lockstep. The schedule therefore depends only on ``eval.num_envs`` and the episodes'
outcomes, never on the worker count or on timing, so per-episode results are identical for 1 or
N workers. (A neural policy sees the same batches for the same ``num_envs``; changing
``num_envs`` changes batch composition, which can move float results in the last bits.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vla_ft.eval.policies import runs_in_worker
from vla_ft.eval.pool_base import BasePool
from vla_ft.eval.scoring import REASON_CRASH, EpisodeResult


@dataclass
class _Active:
    index: int
    seed: int
    instruction: str = ""
    task: str = ""
    obs: dict[str, np.ndarray] | None = None
    steps: int = 0  # env steps the main process knows were executed
    node: str | None = None  # where the worker running it is (Ray backend; None: this machine)
    chunks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # temporal ensembling


@dataclass
class RolloutOutput:
    episodes: list[EpisodeResult]
    videos: dict[int, dict[str, np.ndarray]]  # episode index -> camera key -> (T, H, W, 3)
    restarts: int
    policy_s: float


class _VideoKeeper:
    """Keeps the frames of the lowest-numbered ``n`` successes and ``n`` failures."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.kept: dict[bool, dict[int, Any]] = {True: {}, False: {}}

    def offer(self, index: int, success: bool, frames: dict[str, np.ndarray] | None) -> None:
        if self.n == 0 or frames is None:
            return
        bucket = self.kept[success]
        bucket[index] = frames
        if len(bucket) > self.n:
            del bucket[max(bucket)]

    def may_keep(self, index: int) -> bool:
        """Whether episode ``index`` could still end up with a video (episodes start in index order)."""
        if self.n == 0:
            return False
        return any(len(b) < self.n or index < max(b) for b in self.kept.values())

    def all(self) -> dict[int, dict[str, np.ndarray]]:
        return {**self.kept[True], **self.kept[False]}


def _ensemble(state: _Active, chunk: np.ndarray, weight: float) -> np.ndarray:
    """ACT-style temporal ensembling: average every stored prediction for this step.

    Older predictions get weight ``exp(-weight * i)`` with ``i = 0`` for the oldest.
    Returns the (1, A) action to execute now.
    """
    t = state.steps
    state.chunks.append((t, chunk))
    state.chunks = [(s, c) for s, c in state.chunks if t - s < len(c)]
    preds = np.stack([c[t - s] for s, c in state.chunks])  # (M, A), oldest first
    w = np.exp(-weight * np.arange(len(preds)))[:, None]
    return (preds * w).sum(0, keepdims=True) / w.sum()


class Rollout:
    """Runs ``episodes`` episodes of ``policy`` over a worker pool (spawned processes or Ray actors).

    Args:
        pool: started worker pool (``vla_ft.eval.pool.make_pool``).
        policy: the policy (or an in-worker :class:`ExpertPolicy`).
        episodes: number of episodes.
        seed: episode ``first_index + i`` uses reset seed ``seed + i``.
        n_slots: concurrent episodes.
        replan_every: actions executed open-loop per prediction (None: the whole chunk).
        temporal_ensemble: ensembling weight (None: off); replans at every step when set.
        videos: frames kept for this many successes and this many failures.
        first_index: the number of the first episode; a multi-task evaluation numbers each task's
            episodes after the previous task's so that indices (and video names) stay unique.
        instruction: fed to the policy (and recorded) instead of the env's at every reset; None:
            the env's (set when the env gives none: ``env_match.fallback_instruction``).
    """

    def __init__(
        self,
        pool: BasePool,
        policy: Any,
        episodes: int,
        seed: int,
        n_slots: int,
        replan_every: int | None,
        temporal_ensemble: float | None,
        videos: int,
        first_index: int = 0,
        instruction: str | None = None,
    ) -> None:
        self.pool, self.policy, self.instruction = pool, policy, instruction
        self.seed, self.first_index, self.n_slots = seed, first_index, n_slots
        self.replan_every, self.temporal_ensemble = replan_every, temporal_ensemble
        self.pending = list(range(first_index, first_index + episodes))[::-1]  # pop(): the lowest
        self.active: dict[int, _Active] = {}
        self.results: dict[int, EpisodeResult] = {}
        self.keeper = _VideoKeeper(videos)
        self.policy_s = 0.0  # time spent in predict_action

    # ------------------------------------------------------------------ bookkeeping

    def _finish(
        self, slot: int, success: bool, steps: int, reason: str, frames: Any = None, events: Any = None
    ) -> None:
        st = self.active.pop(slot)
        self.results[st.index] = EpisodeResult(
            st.index, st.seed, st.task, st.instruction, bool(success), int(steps), reason,
            events=events or {}, node=st.node,
        )  # fmt: skip
        self.keeper.offer(st.index, success, frames)

    def _lose_workers(self, lost: list[int]) -> None:
        for slot in sorted(self.active):
            if self.pool.worker_of(slot) in lost:
                self._finish(slot, False, self.active[slot].steps, REASON_CRASH)

    def _by_worker(self, items: dict[int, Any]) -> dict[int, list]:
        out: dict[int, list] = {}
        for slot in sorted(items):
            out.setdefault(self.pool.worker_of(slot), []).append(items[slot])
        return out

    # ------------------------------------------------------------------ one round

    def _reset_free_slots(self) -> None:
        todo = {}
        for slot in range(self.n_slots):
            if slot not in self.active and self.pending:
                idx = self.pending.pop()
                seed = self.seed + idx - self.first_index
                self.active[slot] = _Active(idx, seed, node=self.pool.node_of(self.pool.worker_of(slot)))
                todo[slot] = (slot, idx, seed, self.keeper.may_keep(idx))
        if not todo:
            return
        replies, lost = self.pool.request({w: ("reset", v) for w, v in self._by_worker(todo).items()})
        self._lose_workers(lost)
        for payload in replies.values():
            for slot, obs, instruction, task in payload:
                st = self.active[slot]
                st.obs, st.instruction, st.task = obs, self.instruction or instruction, task

    def _plan(self, slots: list[int]) -> dict[int, tuple]:
        """One batched prediction for the active slots -> step items by slot."""
        if runs_in_worker(self.policy):
            k = self.replan_every or self.policy.steps_per_call
            return {s: (s, None, k) for s in slots}
        obs = {key: np.stack([self.active[s].obs[key] for s in slots]) for key in self.active[slots[0]].obs}
        instructions = [self.active[s].instruction for s in slots]
        t0 = time.perf_counter()
        chunks = np.asarray(self.policy.predict_action(obs, instructions), dtype=np.float32)  # (N, H, A)
        self.policy_s += time.perf_counter() - t0
        adim = int(self.pool.spec["action_dim"])
        if chunks.ndim != 3 or chunks.shape[0] != len(slots) or chunks.shape[2] != adim:
            raise ValueError(
                f"policy.predict_action returned shape {chunks.shape}; expected (N={len(slots)}, H, A={adim})"
            )
        items = {}
        for row, s in enumerate(slots):
            if self.temporal_ensemble is not None:
                items[s] = (s, _ensemble(self.active[s], chunks[row], self.temporal_ensemble), 1)
            else:
                k = min(self.replan_every or chunks.shape[1], chunks.shape[1])
                items[s] = (s, chunks[row, :k], k)
        return items

    def _step(self, items: dict[int, tuple]) -> None:
        replies, lost = self.pool.request({w: ("step", v) for w, v in self._by_worker(items).items()})
        self._lose_workers(lost)
        for payload in replies.values():
            for slot, obs, done in payload:
                if done is not None:
                    self._finish(
                        slot, done["success"], done["steps"], done["reason"], done["frames"], done["events"]
                    )
                else:
                    st = self.active[slot]
                    st.obs = obs
                    st.steps += items[slot][2]

    def run(self) -> RolloutOutput:
        """Roll out every episode; returns results sorted by episode number."""
        while self.pending or self.active:
            self._reset_free_slots()
            slots = sorted(self.active)
            if slots:
                self._step(self._plan(slots))
        episodes = [self.results[i] for i in sorted(self.results)]
        return RolloutOutput(episodes, self.keeper.all(), self.pool.restarts, self.policy_s)
