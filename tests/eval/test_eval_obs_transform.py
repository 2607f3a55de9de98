"""A recorded demo frame and the live frame the evaluator hands the policy give identical model inputs.

A demo is collected and written exactly as ``scripts/collect_demos.py`` does, read back through
the training dataset, and replayed open-loop through :func:`vla_ft.eval.evaluate`; every frame the
policy receives goes through ``obs_to_inputs`` with the dataset's spec and normalizer.
"""

import numpy as np
import pytest
import torch

from vla_ft.config import DataConfig, EnvConfig, EvalConfig
from vla_ft.constants import IMAGES, STATE
from vla_ft.data.collect import EpisodeJob, run_episode
from vla_ft.data.dataset import build_trajectory_datasets
from vla_ft.data.transforms import obs_to_inputs
from vla_ft.data.writer import DemoWriter
from vla_ft.eval import evaluate
from vla_ft.sim.env_types import CollectEnv

pytestmark = pytest.mark.sim

SEED, SIZE, CAMERAS, CHUNK = 4242, 32, ["agentview", "wrist"], 5


class ReplayPolicy:
    """Returns the recorded actions chunk by chunk and keeps every observation it was given."""

    def __init__(self, actions):
        self.actions, self.action_dim, self.t = actions, actions.shape[1], 0
        self.seen = []  # (t, obs)

    def predict_action(self, obs, instructions):
        assert len(instructions) == 1
        self.seen.append((self.t, {k: v[0] for k, v in obs.items()}))
        idx = np.minimum(np.arange(self.t, self.t + CHUNK), len(self.actions) - 1)
        self.t += CHUNK
        return self.actions[idx][None]  # (1, H, A)


def test_recorded_and_live_frames_give_identical_inputs(tmp_path):
    demo = run_episode(
        EpisodeJob(CollectEnv("vla_ft", "pick_place", None, SIZE, tuple(CAMERAS)), SEED, 0.0, 0)
    )
    assert demo["success"]
    path = tmp_path / "demo.hdf5"
    with DemoWriter(path, {"task": "pick_place"}, {"language_instruction": demo["instruction"]}) as writer:
        attrs = {"language_instruction": demo["instruction"], "task": "pick_place", "seed": SEED}
        writer.add_demo(demo["obs"], demo["actions"], demo["rewards"], demo["dones"], demo["states"], attrs)
        writer.close(valid_fraction=0.0)
    train, _, info = build_trajectory_datasets(
        DataConfig(paths=[str(path)], split="random", val_fraction=0.0, chunk=CHUNK), seed=0
    )
    assert len(train) == len(demo["actions"])  # one sample per frame of the single demo

    policy = ReplayPolicy(demo["actions"])
    env = EnvConfig(task="pick_place", image_size=SIZE, cameras=CAMERAS)
    result = evaluate(policy, env, EvalConfig(episodes=1, workers=1, seed=SEED))
    assert result.episodes[0].instruction == demo["instruction"]
    assert result.episodes[0].success and result.episodes[0].steps == len(demo["actions"])

    assert len(policy.seen) >= 3
    for t, live in policy.seen:
        assert set(info.image_keys) | set(info.state_keys) <= set(live)
        live_inputs = obs_to_inputs(live, train.spec, train.normalizer)
        recorded = train[t]
        assert torch.equal(live_inputs[IMAGES], recorded[IMAGES]), f"frame {t}"
        assert torch.equal(live_inputs[STATE], recorded[STATE]), f"frame {t}"
