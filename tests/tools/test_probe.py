"""Offline policy probes (vla_ft.tools.probe) on real collected reach demos."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import vla_ft.data.collect as collect
from envs.env import FINGER_OPEN
from vla_ft.config import ModelConfig, load_config
from vla_ft.errors import ConfigError, DataError
from vla_ft.models import load_vla
from vla_ft.tools.probe import format_probe, probe_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from model_helpers import make_info  # noqa: E402


@pytest.fixture(scope="module")
def reach_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "reach.hdf5"
    cfg = load_config(
        "pick_place.yaml",
        [f"collect.output={out}", "collect.tasks=[reach]", "collect.episodes=5", "env.image_size=32",
         "collect.valid_fraction=0.4"],
    )  # fmt: skip
    collect.run_collect(cfg)
    return out


def _demos(path):
    with h5py.File(path, "r") as f:
        names = sorted(f["data"], key=lambda s: int(s.split("_")[1]))
        return [
            (
                f["data"][n]["actions"][:],
                f["data"][n]["obs/ee_pos"][:],
                f["data"][n].attrs["language_instruction"],
            )
            for n in names
        ]


class EePolicy:
    """Predicts (ee_x, ee_y, ee_z, 0) of the newest frame: a probe subject with known outputs."""

    def __init__(self):
        self.dims = SimpleNamespace(image_keys=["agentview_image"], state_keys=["ee_pos"], history=2)
        self.seen: list[tuple[tuple, list[str]]] = []

    def predict_action(self, obs, instructions):
        assert obs["agentview_image"].shape[1:3] == (2, 32) and obs["ee_pos"].shape[1:] == (2, 3)
        self.seen.append((obs["ee_pos"].shape, list(instructions)))
        ee = obs["ee_pos"][:, -1]
        return np.concatenate([ee, np.zeros((len(ee), 1))], 1)[:, None].astype(np.float32)


def test_probe_rows_match_a_hand_computation(reach_file):
    demos = _demos(reach_file)
    pol = EePolicy()
    res = probe_policy(pol, str(reach_file), demos=10)
    assert res.demos == 5
    assert sum(r["frames"] for r in res.rows) == sum(len(a) for a, _, _ in demos)
    first = res.rows[0]
    assert first["steps"] == "0" and first["frames"] == 5
    a0 = np.array([a[0] for a, _, _ in demos])
    p0 = np.array([np.r_[ee[0], 0.0] for _, ee, _ in demos])
    np.testing.assert_allclose(first["l1"], np.abs(p0 - a0).mean(0), atol=1e-5)
    np.testing.assert_allclose(first["corr"][0], np.corrcoef(p0[:, 0], a0[:, 0])[0, 1], atol=1e-5)
    assert first["corr"][3] is None  # constant prediction: correlation undefined, not NaN
    # reach demos have several instructions: the swap probe ran, with another demo's instruction
    assert res.swap is not None and res.swap["frames"] == sum(len(a) for a, _, _ in demos)
    assert len(pol.seen) == 2 * len(demos)  # per demo: own instruction, then another one
    for (_, own), (_, other), (_, _, instr) in zip(pol.seen[::2], pol.seen[1::2], demos, strict=True):
        assert set(own) == {instr} and len(set(other)) == 1 and other[0] != instr
    assert res.swap["changed"] == [0.0] * 4  # this policy ignores the instruction, and the probe says so
    text = format_probe(res)
    assert "| 0 | 5 |" in text and "Instruction swap" in text


def test_probe_real_policy_and_mask(reach_file):
    # seeded: how much an untrained policy's output moves with the instruction depends on its init
    # (the probe rounds to 1e-6), and unseeded it followed the RNG state earlier tests left
    torch.manual_seed(0)
    policy = load_vla(ModelConfig(preset="tiny"), make_info(size=32)).eval()  # ee_pos + gripper_qpos
    res = probe_policy(policy, str(reach_file), mask="valid")
    with h5py.File(reach_file, "r") as f:
        valid = [n.decode() for n in f["mask/valid"][:]]
        frames = sum(len(f["data"][n]["actions"]) for n in valid)
    assert res.demos == len(valid) and sum(r["frames"] for r in res.rows) == frames
    assert all(np.isfinite(r["l1"]).all() for r in res.rows)
    if res.swap is not None:  # an untrained policy still reads the instruction tokens
        assert max(res.swap["changed"]) > 0


def test_probe_errors(reach_file):
    with pytest.raises(ConfigError, match="no filter key mask/nope"):
        probe_policy(EePolicy(), str(reach_file), mask="nope")
    pol = EePolicy()
    pol.dims.state_keys = ["joint_pos"]
    with pytest.raises(DataError, match="joint_pos"):
        probe_policy(pol, str(reach_file))


class CornerHeatPolicy(EePolicy):
    """EePolicy with two keypoint heat maps (4x5 cells) per camera that always peak in one cell."""

    heatmap_count = 2

    def __init__(self, cell=(0, 0)):
        super().__init__()
        self.cell = cell  # (row, column)
        self.maps_seen: list[tuple[tuple, list[str]]] = []

    def heatmaps(self, obs, instructions):
        self.maps_seen.append((obs["agentview_image"].shape, list(instructions)))
        probs = np.full((len(instructions), 1, 2, 4, 5), 0.01, dtype=np.float32)
        probs[..., self.cell[0], self.cell[1]] = 1.0
        return probs / probs.sum((-2, -1), keepdims=True)


def test_grounding_probe_scores_first_frame_peaks_against_the_labels(reach_file):
    with h5py.File(reach_file, "r") as f:
        names = sorted(f["data"], key=lambda s: int(s.split("_")[1]))
        uv = np.stack([f["data"][n]["targets/agentview_image"][0] for n in names])  # (N, 2, 2)
        instr = [f["data"][n].attrs["language_instruction"] for n in names]
    pol = CornerHeatPolicy(cell=(3, 1))  # bottom row, second column: centre (-1 + 3/5, -1 + 7/4)
    res = probe_policy(pol, str(reach_file))
    assert len(pol.maps_seen) == 1 and pol.maps_seen[0][0][:2] == (5, 2)  # frame 0 of each demo, one batch
    assert pol.maps_seen[0][1] == instr
    named, dest = res.grounding
    assert (named["camera"], named["target"], dest["target"]) == (
        "agentview_image",
        "named object",
        "destination",
    )
    # by hand, in cells: the peak cell's centre minus the labelled named object (reach names one)
    err = np.hypot((-1 + 3 / 5 - uv[:, 0, 0]) * 5 / 2, (-1 + 7 / 4 - uv[:, 0, 1]) * 4 / 2)
    assert named["frames"] == 5
    assert named["mean_error_cells"] == pytest.approx(err.mean())
    assert named["within_one_cell"] == pytest.approx((err <= 1).mean())
    # reach has no destination: no labelled frame, no score (not a 0%)
    assert np.isnan(uv[:, 1]).all() and dest["frames"] == 0 and dest["within_one_cell"] is None
    text = format_probe(res)
    assert (
        "## Grounding" in text
        and f"| agentview_image | named object | 5 | {100 * (err <= 1).mean():.0f}% |" in text
    )
    assert "| agentview_image | destination | 0 | - | - |" in text
    # a policy without heat maps: the probe says nothing about grounding
    assert probe_policy(EePolicy(), str(reach_file)).grounding is None


def test_grounding_probe_runs_on_a_real_keypoint_policy(reach_file):
    policy = load_vla(ModelConfig(preset="tiny"), make_info(size=32)).eval()
    probs = policy.heatmaps(
        {
            "agentview_image": np.zeros((3, 1, 32, 32, 3), np.uint8),
            "wrist_image": np.zeros((3, 1, 32, 32, 3), np.uint8),
            "ee_pos": np.zeros((3, 1, 3), np.float32),
            "gripper_qpos": np.zeros((3, 1, 2), np.float32),
        },
        ["reach for the red cube"] * 3,
    )
    assert probs.shape[:3] == (3, 2, 8) and np.allclose(probs.sum((-2, -1)), 1.0, atol=1e-5)
    res = probe_policy(policy, str(reach_file))
    assert [(g["camera"], g["target"]) for g in res.grounding] == [
        (cam, what) for cam in policy.dims.image_keys for what in ("named object", "destination")
    ]
    named = res.grounding[0]
    assert named["frames"] == 5 and 0.0 <= named["within_one_cell"] <= 1.0 and named["mean_error_cells"] >= 0
    no_heat = load_vla(ModelConfig(preset="tiny", extra={"keypoints": 0, "film": False}), make_info(size=32))
    with pytest.raises(ValueError, match="no keypoint heat maps"):
        no_heat.heatmaps({}, [])


class FingerPolicy(EePolicy):
    """Predicts the gripper from the fingers it sees (closed below 80% of open): the copy-the-state
    policy that probe 4 exists to catch. The other dimensions are 0."""

    def __init__(self):
        super().__init__()
        self.dims.state_keys = ["ee_pos", "gripper_qpos"]

    def predict_action(self, obs, instructions):
        closed = obs["gripper_qpos"][:, -1].mean(-1) < 0.8 * FINGER_OPEN
        out = np.zeros((len(closed), 1, 4), np.float32)
        out[:, 0, 3] = np.where(closed, 1.0, -1.0)
        return out


@pytest.fixture(scope="module")
def pick_place_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe_pp") / "pick_place.hdf5"
    cfg = load_config(
        "pick_place.yaml",
        [f"collect.output={out}", "collect.episodes=3", "env.image_size=32", "collect.valid_fraction=0.34"],
    )
    collect.run_collect(cfg)
    return out


def test_gripper_probe_catches_a_policy_that_copies_the_fingers(pick_place_file):
    res = probe_policy(FingerPolicy(), str(pick_place_file))
    # by hand from the file: each sign change of the command, the policy's rule on the fingers
    expected = {"close": [], "open": []}
    with h5py.File(pick_place_file, "r") as f:
        for name in sorted(f["data"], key=lambda s: int(s.split("_")[1])):
            g, q = f["data"][name]["actions"][:, 3], f["data"][name]["obs/gripper_qpos"][:].mean(-1)
            pred = np.where(q < 0.8 * FINGER_OPEN, 1.0, -1.0)
            for t in range(1, len(g)):
                if np.sign(g[t]) != np.sign(g[t - 1]):
                    row = [
                        pred[t + o] == np.sign(g[t]) if 0 <= t + o < len(g) else None for o in range(-2, 4)
                    ]
                    expected["close" if g[t] > 0 else "open"].append(row)
    assert len(expected["close"]) >= 3 and len(expected["open"]) >= 3  # every expert demo grasps and releases
    by = {g["switch"]: g for g in res.gripper}
    assert set(by) == {"close", "open"}
    for what, rows in expected.items():
        assert by[what]["switches"] == len(rows) and by[what]["dim"] == 3
        assert by[what]["offsets"] == [-2, -1, 0, 1, 2, 3]
        want = [np.mean([r for r in col if r is not None]) for col in zip(*rows, strict=True)]
        assert by[what]["new_sign"] == pytest.approx(want)
        # the signature: never at the switch (the fingers move one step after the command), always after
        assert by[what]["new_sign"][2] == 0.0 and by[what]["new_sign"][3] == 1.0
    text = format_probe(res)
    assert "## Gripper switches" in text and "| open | " in text and "| close | " in text
    assert res.to_dict()["gripper"] == res.gripper
    # a policy that always predicts 0 (EePolicy's gripper) has no sign: never the new one
    zero = {g["switch"]: g["new_sign"] for g in probe_policy(EePolicy(), str(pick_place_file)).gripper}
    assert zero == {"close": [0.0] * 6, "open": [0.0] * 6}
    with pytest.raises(ConfigError, match="gripper_dim=4: .* has 4 action dimensions; use -4..3"):
        probe_policy(FingerPolicy(), str(pick_place_file), gripper_dim=4)


def test_gripper_probe_is_silent_where_the_demos_never_switch(reach_file):
    res = probe_policy(EePolicy(), str(reach_file))
    assert res.gripper == [] and "Gripper switches" not in format_probe(res)
