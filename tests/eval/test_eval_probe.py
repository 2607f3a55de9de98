"""Offline policy probes (vla_ft.eval.probe) on real collected reach demos."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import vla_ft.data.collect as collect
from vla_ft.config import ModelConfig, load_config
from vla_ft.errors import ConfigError, DataError
from vla_ft.eval.probe import format_probe, probe_policy
from vla_ft.models import load_vla

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
