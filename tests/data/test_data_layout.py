"""One history-padding rule and one gripper-dimension rule, shared by the dataset, the policy, the
evaluation workers, the probe and the loss."""

from __future__ import annotations

import numpy as np

from vla_ft.data.layout import GRIPPER_DIM, gripper_index, history_indices


def test_history_indices_repeat_frame_0_before_the_start():
    assert history_indices(0, 3).tolist() == [0, 0, 0]
    assert history_indices(1, 3).tolist() == [0, 0, 1]
    assert history_indices(5, 3).tolist() == [3, 4, 5]
    assert history_indices(np.array([0, 4]), 2).tolist() == [[0, 0], [3, 4]]
    assert history_indices(np.arange(6).reshape(2, 3), 1).shape == (2, 3, 1)


def test_history_indices_pad_a_short_queue_as_the_workers_and_the_policy_do():
    frames = ["a", "b"]  # two frames seen, four wanted: the first repeats
    assert [frames[i] for i in history_indices(len(frames) - 1, 4)] == ["a", "a", "a", "b"]


def test_gripper_index():
    assert GRIPPER_DIM == -1 and gripper_index(7) == 6
    assert gripper_index(4, 0) == 0 and gripper_index(4, -4) == 0 and gripper_index(4, 3) == 3
    assert gripper_index(4, 4) is None and gripper_index(4, -5) is None
