"""Where things are in the arrays: the gripper's action dimension and the frames of an observation
history. The dataset, the loss, the policy, the evaluation workers and the probe all use these.

Numpy only: evaluation workers import this module and must not import torch.
"""

from __future__ import annotations

import numpy as np

# the action dimension of the gripper command (its sign: open / close), the last one as in robomimic,
# LIBERO and envs/; ``loss.gripper_dim`` and the probe's ``gripper_dim`` choose another
GRIPPER_DIM = -1


def gripper_index(action_dim: int, dim: int = GRIPPER_DIM) -> int | None:
    """``dim`` (negative: counted from the end) as an index into an ``action_dim``-dim action.

    Returns:
        The index in ``[0, action_dim)``, or None when ``dim`` is out of range (the caller names
        the option that set it).
    """
    if not -action_dim <= dim < action_dim:
        return None
    return dim % action_dim


def history_indices(t: int | np.ndarray, history: int) -> np.ndarray:
    """Frame indices ``t - history + 1 .. t`` (oldest first), clamped at 0: before an episode's first
    frame, frame 0 repeats.

    Args:
        t: the current frame index, an int or an int array of any shape S.
        history: frames per observation (T).

    Returns:
        int64 array of shape S + (T,).
    """
    return np.maximum(np.asarray(t, dtype=np.int64)[..., None] + np.arange(1 - history, 1), 0)
