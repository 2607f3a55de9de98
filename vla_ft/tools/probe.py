"""Offline probes of a trained policy on demonstrations (no simulator): questions validation loss
cannot answer.

1. **Does it find the goal from the first frame, or only keep going?** The error and the
   prediction/label correlation of the first predicted action, per time step of the demo. A policy
   that is good from step 1 on but uncorrelated at step 0 reads the direction of motion from the
   observation (the hand's position relative to a fixed start, a finger lagging the hand) instead
   of from the goal: causal confusion. It scores well on validation frames and fails closed loop,
   because at an episode start there is no motion to copy.
2. **Does it use the instruction?** The same frames with the instruction of another demo (one with
   a different instruction). If the error barely moves, the policy ignores the language.
3. **Does it look at the named object?** For policies with keypoint heat maps and files with
   grounding labels (``targets/<camera>``): how often the peak of heat map 0 (trained to find the
   named object) and 1 (the destination) lies within one cell of the labelled position on each
   demo's first frame, where the policy decides what to reach for: a wrong first-frame peak
   predicts a wrong grasp.
4. **Does it switch the gripper when the demo does, or one step after?** At each frame where the
   demo's gripper command changes sign (close, then open: the release), the share of predictions
   with the new sign a few steps before, at and after the switch. Offline, a policy that reads the
   switch from the fingers it sees (they move one step after the command) is right from +1 on and
   wrong at 0; closed loop nothing moves the fingers first, so it never switches.

What each probe found in this project's own policies: docs/experiments/2026-11-pick-place-rounds.md
(rounds 3, 6 and 7) and docs/experiments/2026-12-05-suite-policy.md.
``vla-ft probe`` (:func:`run_probe`; also ``scripts/probe_policy.py``) is the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vla_ft.config import DataConfig
from vla_ft.data.layout import GRIPPER_DIM, gripper_index, history_indices
from vla_ft.data.reader import open_h5, read_frames, scan_file
from vla_ft.data.scan import Demo, FileScan
from vla_ft.errors import ConfigError
from vla_ft.models import VLAPolicy
from vla_ft.models.policy import HeatmapSource
from vla_ft.models.vision import cell_centres

LATE_FROM = 8  # time steps >= this are pooled into one row
SWITCH_OFFSETS = tuple(range(-2, 4))  # frames around a gripper switch scored by probe 4


@dataclass
class ProbeResult:
    """What :func:`probe_policy` measured (env units, first action of each predicted chunk).

    Attributes:
        rows: per time-step group: {"steps", "frames", "l1", "mean_abs_label", "corr"} (lists per dim).
        swap: {"l1_own", "l1_swapped", "changed", "frames"} or None when every demo has the same
            instruction.
        demos: demos probed.
        grounding: per camera and heat map ("named object", "destination"): {"camera", "target",
            "frames", "within_one_cell", "mean_error_cells"} on the first frame of each demo; None
            when the policy has no heat maps or the file no grounding labels.
        gripper: per switch direction ("close": the command turns positive, "open": negative):
            {"switch", "dim", "switches", "offsets", "new_sign"}, ``new_sign[i]`` the share of the
            switches whose prediction at ``offsets[i]`` frames from the switch has the new sign
            (None where no switch has that frame); empty when no demo switches.
    """

    rows: list[dict[str, Any]]
    swap: dict[str, Any] | None
    demos: int
    grounding: list[dict[str, Any]] | None = None
    gripper: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "swap": self.swap,
            "demos": self.demos,
            "grounding": self.grounding,
            "gripper": self.gripper,
        }


def _corr(p: np.ndarray, a: np.ndarray) -> list[float | None]:
    out: list[float | None] = []
    for i in range(a.shape[1]):
        if len(a) < 3 or p[:, i].std() < 1e-9 or a[:, i].std() < 1e-9:
            out.append(None)  # undefined: constant predictions or labels
        else:
            out.append(float(np.corrcoef(p[:, i], a[:, i])[0, 1]))
    return out


def _demo_obs(h5: h5py.File, demo: Demo, scan: FileScan, history: int) -> dict[str, np.ndarray]:
    """Observations of every frame of ``demo`` stacked on a history axis: {key: (T, history, ...)}.

    Same frames as ``TrajectoryDataset.get_batch``: t-history+1..t, frame 0 repeated before the start.
    """
    t = np.arange(demo.length)
    hist = history_indices(t, history)  # (T, history), oldest first
    obs = {key: read_frames(h5, demo.name, key, t)[hist] for key in scan.image_keys}
    states = np.split(demo.state, np.cumsum(scan.state_dims)[:-1], axis=-1)  # the scan's key order
    obs.update({key: part[hist] for key, part in zip(scan.state_keys, states, strict=True)})
    return obs


def probe_policy(
    policy: Any,
    path: str,
    demos: int = 100,
    mask: str | None = None,
    batch: int = 256,
    gripper_dim: int = GRIPPER_DIM,
) -> ProbeResult:
    """Run the probes of the module docstring on the first ``demos`` demos of ``path``.

    Args:
        policy: a VLAPolicy (or anything with ``predict_action(obs, instructions)`` and ``dims``).
        path: an HDF5 trajectory file with the policy's image and state keys.
        demos: how many demos to probe (file order).
        mask: probe only the demos of this filter key (``mask/<name>``, e.g. ``valid``).
        batch: frames per forward pass.
        gripper_dim: the action dimension whose sign is the gripper command (probe 4; ``-1``: the
            last, as in robomimic, LIBERO and envs/).

    Raises:
        DataError: the file lacks a key the policy reads (the message names file and key).
        ConfigError: ``mask`` is not a filter key of the file, or selects no demo; ``gripper_dim``
            is not an action dimension of the file.
    """
    dims = policy.dims
    if not isinstance(gripper_dim, int) or isinstance(gripper_dim, bool):
        raise ConfigError(f"gripper_dim={gripper_dim!r}: give an action dimension index, e.g. -1 (the last)")
    image_keys, state_keys = list(dims.image_keys), list(dims.state_keys)
    cfg = DataConfig(paths=[path], image_keys=image_keys, state_keys=state_keys)
    scan = scan_file(path, cfg)  # DataError names the file and key when one is missing
    pool = scan.demos
    if mask is not None:
        if mask not in scan.masks:
            have = ", ".join(sorted(scan.masks)) or "none"
            raise ConfigError(f"{path}: no filter key mask/{mask} (the file has: {have})")
        names = set(scan.masks[mask])
        pool = [d for d in scan.demos if d.name in names]
    chosen = pool[: max(1, demos)]
    action_dim = chosen[0].actions.shape[1] if chosen else None
    if action_dim is not None and gripper_index(action_dim, gripper_dim) is None:  # before any forward pass
        raise ConfigError(
            f"gripper_dim={gripper_dim}: {path} has {action_dim} action dimensions; use -{action_dim}.."
            f"{action_dim - 1} (the gripper command's dimension, usually -1)"
        )
    instructions = [d.instruction for d in chosen]
    distinct = sorted(set(instructions))
    preds, swapped, labels, steps = [], [], [], []
    firsts: list[tuple[dict[str, np.ndarray], Demo]] = []  # frame 0 of each demo with grounding labels
    with open_h5(path) as h5:
        for demo in chosen:
            obs = _demo_obs(h5, demo, scan, dims.history)
            if demo.targets is not None:
                firsts.append(({k: v[0] for k, v in obs.items()}, demo))
            other = None
            if len(distinct) > 1:  # the next distinct instruction in sorted order: never the demo's own
                other = distinct[(distinct.index(demo.instruction) + 1) % len(distinct)]
            for lo in range(0, demo.length, batch):
                part = {k: v[lo : lo + batch] for k, v in obs.items()}
                n = len(next(iter(part.values())))
                preds.append(policy.predict_action(part, [demo.instruction] * n)[:, 0])
                if other is not None:
                    swapped.append(policy.predict_action(part, [other] * n)[:, 0])
            labels.append(demo.actions)
            steps.append(np.arange(demo.length))
    if not preds:
        raise ConfigError(f"{path}: no demos to probe" + (f" in mask/{mask}" if mask else ""))
    pred, label, step = np.concatenate(preds), np.concatenate(labels), np.concatenate(steps)
    rows = []
    groups = [(t, t) for t in range(min(LATE_FROM, int(step.max()) + 1))]
    if step.max() >= LATE_FROM:
        groups.append((LATE_FROM, int(step.max())))
    for lo, hi in groups:
        m = (step >= lo) & (step <= hi)
        rows.append(
            {
                "steps": f"{lo}" if lo == hi else f"{lo}-{hi}",
                "frames": int(m.sum()),
                "l1": np.abs(pred[m] - label[m]).mean(0).round(6).tolist(),
                "mean_abs_label": np.abs(label[m]).mean(0).round(6).tolist(),
                "corr": _corr(pred[m], label[m]),
            }
        )
    grounding = None
    if firsts and isinstance(policy, HeatmapSource) and policy.heatmap_count:
        grounding = _grounding(policy, firsts)
    swap = None
    if swapped:
        alt = np.concatenate(swapped)
        swap = {
            "l1_own": np.abs(pred - label).mean(0).round(6).tolist(),
            "l1_swapped": np.abs(alt - label).mean(0).round(6).tolist(),
            "changed": np.abs(alt - pred).mean(0).round(6).tolist(),
            "frames": int(len(pred)),
        }
    g = gripper_index(action_dim, gripper_dim)
    gripper = _gripper_switches(pred[:, g], label[:, g], step, g)
    return ProbeResult(rows=rows, swap=swap, demos=len(chosen), grounding=grounding, gripper=gripper)


def _gripper_switches(
    pred: np.ndarray, label: np.ndarray, step: np.ndarray, dim: int
) -> list[dict[str, Any]]:
    """Probe 4: the predicted gripper sign around each sign change of the demos' gripper command.

    ``pred``/``label``/``step``: the probed frames of all demos, concatenated in order (``step``
    restarts at 0 with each demo). A switch is a frame whose command's sign differs from the
    previous frame's in the same demo (zero commands carry no sign and are skipped).
    """
    starts = np.flatnonzero(step == 0)
    ends = np.r_[starts[1:], len(step)]
    found: dict[str, list[list[bool]]] = {"close": [], "open": []}
    for lo, hi in zip(starts, ends, strict=True):
        sign = np.sign(label[lo:hi])
        nz = np.flatnonzero(sign)
        for prev, cur in zip(nz[:-1], nz[1:], strict=False):
            if sign[cur] == sign[prev]:
                continue
            scores = []
            for o in SWITCH_OFFSETS:
                t = cur + o
                scores.append(bool(np.sign(pred[lo + t]) == sign[cur]) if 0 <= t < hi - lo else None)
            found["close" if sign[cur] > 0 else "open"].append(scores)
    out = []
    for what, switches in found.items():
        if not switches:
            continue
        cols = list(zip(*switches, strict=True))
        shares = [None if all(c is None for c in col) else float(np.mean([c for c in col if c is not None]))
                  for col in cols]  # fmt: skip
        out.append(
            {
                "switch": what,
                "dim": dim,
                "switches": len(switches),
                "offsets": list(SWITCH_OFFSETS),
                "new_sign": shares,
            }
        )
    return out


GROUNDED = ("named object", "destination")  # heat maps 0 and 1 (the ``grounding`` loss term)


def _grounding(policy: Any, firsts: list[tuple[dict[str, np.ndarray], Demo]]) -> list[dict[str, Any]]:
    """Heat-map peaks against the grounding labels on each demo's first frame (probe 3)."""
    labelled = [d for _, d in firsts]
    first = {k: np.stack([o[k] for o, _ in firsts]) for k in firsts[0][0]}  # (N, T, ...) frame 0 of each
    probs = np.concatenate(
        [
            policy.heatmaps(
                {k: v[lo : lo + 64] for k, v in first.items()},
                [d.instruction for d in labelled[lo : lo + 64]],
            )
            for lo in range(0, len(labelled), 64)
        ]
    )  # (N, K, Q, h, w)
    h, w = probs.shape[-2:]
    peak = probs.reshape(*probs.shape[:3], -1).argmax(-1)  # (N, K, Q)
    peak_xy = cell_centres(h, w).numpy()[peak]  # (N, K, Q, 2): the peak cell's centre, image (x, y)
    target = np.stack([d.targets[0] for d in labelled])  # (N, K, 2 objects, 2)
    out = []
    for k, camera in enumerate(policy.dims.image_keys):
        for j, what in enumerate(GROUNDED[: probs.shape[2]]):
            uv = target[:, k, j]
            seen = np.isfinite(uv).all(-1) & (np.abs(uv) <= 1).all(-1)  # labelled and in view
            err = np.hypot((peak_xy[:, k, j, 0] - uv[:, 0]) * w / 2, (peak_xy[:, k, j, 1] - uv[:, 1]) * h / 2)
            err = err[seen]
            out.append(
                {
                    "camera": camera,
                    "target": what,
                    "frames": int(seen.sum()),
                    "within_one_cell": float((err <= 1.0).mean()) if len(err) else None,
                    "mean_error_cells": float(err.mean()) if len(err) else None,
                }
            )
    return out


def format_probe(result: ProbeResult) -> str:
    """Markdown tables of a :class:`ProbeResult`."""

    def fmt(xs: list) -> str:
        return " ".join("-" if x is None else f"{x:.3f}" for x in xs)

    lines = [
        "## First predicted action vs label, by time step (env units, per action dim)",
        "",
        "| step | frames | L1 | mean abs label | corr(pred, label) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['steps']} | {r['frames']} | {fmt(r['l1'])} | {fmt(r['mean_abs_label'])} | {fmt(r['corr'])} |"
        for r in result.rows
    ]
    lines += [
        "",
        "Causal-confusion signature: low corr at step 0 and high corr from step 1 on (the policy copies",
        "the motion it sees instead of finding the goal).",
        "",
    ]
    if result.swap is None:
        lines.append("Instruction swap: skipped (every probed demo has the same instruction).")
    else:
        s = result.swap
        lines += [
            "## Instruction swap (another demo's instruction on the same frames)",
            "",
            "| L1 own instruction | L1 swapped | mean abs change | frames |",
            "|---|---|---|---|",
            f"| {fmt(s['l1_own'])} | {fmt(s['l1_swapped'])} | {fmt(s['changed'])} | {s['frames']} |",
            "",
            "If L1 swapped is close to L1 own, the policy does not use the instruction.",
        ]
    if result.grounding is not None:
        lines += [
            "",
            "## Grounding: heat-map peak vs the labelled object, first frame of each demo",
            "",
            "| camera | heat map of | frames | peak within one cell | mean error (cells) |",
            "|---|---|---|---|---|",
        ]
        for g in result.grounding:
            within = "-" if g["within_one_cell"] is None else f"{100 * g['within_one_cell']:.0f}%"
            err = "-" if g["mean_error_cells"] is None else f"{g['mean_error_cells']:.2f}"
            lines.append(f"| {g['camera']} | {g['target']} | {g['frames']} | {within} | {err} |")
        lines += [
            "",
            "A policy reaches for what its named-object map peaks on: a miss here is a wrong grasp.",
        ]
    if result.gripper:
        offsets = result.gripper[0]["offsets"]
        lines += [
            "",
            f"## Gripper switches: share of predictions with the new sign (action dim {result.gripper[0]['dim']})",
            "",
            "| switch | switches | " + " | ".join(f"{o:+d}" for o in offsets) + " |",
            "|---|---|" + "---|" * len(offsets),
        ]
        for g in result.gripper:
            cells = " | ".join("-" if x is None else f"{x:.2f}" for x in g["new_sign"])
            lines.append(f"| {g['switch']} | {g['switches']} | {cells} |")
        lines += [
            "",
            "Columns: frames from the demo's switch. Low at +0 and high from +1 on: the policy copies",
            "the fingers it sees, and closed loop it never makes the switch itself.",
        ]
    return "\n".join(lines) + "\n"


def run_probe(
    checkpoint: str,
    data: str,
    demos: int = 100,
    mask: str | None = None,
    gripper_dim: int = GRIPPER_DIM,
    json_path: str | Path | None = None,
) -> ProbeResult:
    """``vla-ft probe``: load ``checkpoint``, probe it on ``data`` (:func:`probe_policy`), print the
    tables (and write the numbers as JSON to ``json_path``)."""
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    policy = VLAPolicy.from_pretrained(checkpoint).eval()
    result = probe_policy(policy, data, demos=demos, mask=mask, gripper_dim=gripper_dim)
    print(f"# Probe of {checkpoint} on {result.demos} demos of {data}\n")
    print(format_probe(result))
    if json_path:
        out = Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": checkpoint, "data": data, **result.to_dict()}, indent=1))
        print(f"wrote {out}")
    return result
