"""WAYPOINT targets: where the hand is at the next gripper open/close, relative to now."""

import numpy as np
import pytest

from vla_ft.config import DataConfig
from vla_ft.constants import WAYPOINT
from vla_ft.data.dataset import build_datasets
from vla_ft.data.trajectory import next_waypoints
from vla_ft.errors import DataError


def test_next_waypoints_by_hand():
    ee = np.zeros((12, 3))
    ee[:, 0] = np.arange(12)  # x = global frame index
    ee[:, 2] = -np.arange(12)
    # demo A (7 frames): open, open, close x3, open x2; demo B (5 frames): never toggles
    grip = np.array([-1, -1, 1, 1, 1, -1, -1, 1, 1, 1, 1, 1], dtype=float)
    wp = next_waypoints(ee, grip, np.array([7, 5]))
    # A: toggles at local frames 2 (close) and 5 (open), then its last frame 6
    assert wp[:7, 0].tolist() == [2, 1, 3, 2, 1, 1, 0]
    # B: only its last frame (global 11) is a waypoint; demos never look into each other
    assert wp[7:, 0].tolist() == [4, 3, 2, 1, 0]
    assert np.array_equal(wp[:, 2], -wp[:, 0]) and not wp[:, 1].any()


@pytest.mark.parametrize(
    "fixture,key", [("ours_file", "ee_pos"), ("robomimic_file", "robot0_eef_pos"), ("libero_file", "ee_pos")]
)
def test_dataset_waypoints_auto_key(request, tokenizer, fixture, key):
    path = request.getfixturevalue(fixture)
    cfg = DataConfig(paths=[str(path)], chunk=2, instruction="lift the cube")
    train, val, info = build_datasets(cfg, tokenizer, seed=0)
    assert info.waypoint_key == key
    # the fixture's gripper command is constant: the only waypoint is each demo's last frame, and
    # every ee_pos axis grows by 1 per frame, so the raw target is (length - 1 - t) on every axis
    d = 1
    length, start = int(train.demo_len[d]), int(train.demo_start[d])
    raw = np.stack([train[start + t][WAYPOINT].numpy() * train.waypoint_scale for t in range(length)])
    expected = (length - 1 - np.arange(length))[:, None].repeat(3, 1)
    np.testing.assert_allclose(raw, expected, rtol=1e-5, atol=1e-5)
    # normalized by the training std; validation reuses the training scale
    assert np.allclose(train.waypoints.std(0), 1.0, atol=1e-4)
    if val is not None:
        assert np.array_equal(val.waypoint_scale, train.waypoint_scale)
    batch = train.get_batch([0, 1, 2])
    assert batch[WAYPOINT].shape == (3, 3) and batch[WAYPOINT].dtype.is_floating_point


def test_waypoint_key_off_and_errors(tokenizer, ours_file):
    train, _, info = build_datasets(DataConfig(paths=[str(ours_file)], waypoint_key=None), tokenizer, 0)
    assert info.waypoint_key is None
    assert WAYPOINT not in train[0]
    with pytest.raises(DataError, match="data.waypoint_key='tcp'.*ee_pos"):
        build_datasets(DataConfig(paths=[str(ours_file)], waypoint_key="tcp"), tokenizer, 0)
    with pytest.raises(DataError, match="gripper_qpos.*2 dims.*3-D"):
        build_datasets(DataConfig(paths=[str(ours_file)], waypoint_key="gripper_qpos"), tokenizer, 0)
