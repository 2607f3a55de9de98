"""A file our envs write (real MuJoCo rollouts + vla_ft.data.writer) read by the dataset, and the
recorded frame vs the live env frame through obs_to_inputs."""

import numpy as np
import pytest
import torch

from vla_ft.config import DataConfig
from vla_ft.constants import ACTION, ACTION_IS_PAD, IMAGES, INSTR_IDS, STATE, TASK_ID
from vla_ft.data.dataset import build_datasets
from vla_ft.data.transforms import obs_to_inputs

pytestmark = pytest.mark.sim
STEPS, SIZE, SEEDS = 12, 32, (0, 1, 2, 3)


@pytest.fixture(scope="module")
def envs_file(tmp_path_factory):
    from vla_ft.data.collect import EpisodeJob, _close_envs, run_episode
    from vla_ft.data.writer import DemoWriter
    from vla_ft.sim.env_types import CollectEnv

    path = tmp_path_factory.mktemp("envs") / "pick_place.hdf5"
    try:
        spec = CollectEnv("vla_ft", "pick_place", STEPS, SIZE, ("agentview", "wrist"))
        eps = [run_episode(EpisodeJob(spec, s, 0.0, 0)) for s in SEEDS]
    finally:
        _close_envs()
    with DemoWriter(path, {"env_name": "pick_place"}, {"language_instruction": eps[0]["instruction"]}) as w:
        for ep in eps:
            attrs = {"language_instruction": ep["instruction"], "task": ep["task"], "seed": ep["seed"]}
            w.add_demo(ep["obs"], ep["actions"], ep["rewards"], ep["dones"], ep["states"], attrs)
        w.close(valid_fraction=0.25, seed=0)
    return path, eps


def test_envs_file_samples(envs_file, tokenizer):
    path, eps = envs_file
    train, val, info = build_datasets(DataConfig(paths=[str(path)], chunk=5, history=2), tokenizer, seed=0)
    assert info.image_keys == ["agentview_image", "wrist_image"] and info.state_keys == [
        "ee_pos",
        "gripper_qpos",
    ]
    assert info.action_dim == 4 and info.state_dim == 5 and info.image_size == (SIZE, SIZE)
    assert info.num_train_demos == 3 and info.num_val_demos == 1  # the writer's mask/valid
    assert info.task_names == ["pick_place"]
    batch = train.get_batch(np.arange(len(train)))
    assert batch[IMAGES].shape == (len(train), 2, 2, 3, SIZE, SIZE) and batch[IMAGES].dtype == torch.uint8
    assert batch[STATE].shape == (len(train), 2, 5) and torch.isfinite(batch[STATE]).all()
    assert batch[ACTION_IS_PAD].sum().item() == 3 * (1 + 2 + 3 + 4)  # last 4 steps of each demo pad
    assert (batch[TASK_ID] == 0).all() and (batch[INSTR_IDS][:, 0] > 0).all()
    demo = train.refs[0].name
    ep = eps[int(demo.split("_")[1])]
    np.testing.assert_allclose(
        info.normalizer.unnormalize_action(train[0][ACTION]).numpy(), ep["actions"][:5], rtol=1e-5, atol=1e-5
    )


def test_recorded_frame_equals_live_frame(envs_file):
    import envs

    path, eps = envs_file
    train, _, info = build_datasets(DataConfig(paths=[str(path)], image_size=24), _NoTok(), seed=0)
    ref = train.refs[1]
    ep = eps[int(ref.name.split("_")[1])]
    t = 7
    env = envs.make("pick_place", image_size=SIZE, cameras=("agentview", "wrist"), max_steps=STEPS)
    try:
        obs, _ = env.reset(seed=ep["seed"])
        for a in ep["actions"][:t]:
            obs, *_ = env.step(a)
    finally:
        env.close()
    live = obs_to_inputs(obs, info.obs_spec(), info.normalizer)
    sample = train[int(train.demo_start[1]) + t]
    assert live[IMAGES].shape == (1, 2, 3, 24, 24)
    assert torch.equal(live[IMAGES], sample[IMAGES])
    assert torch.equal(live[STATE], sample[STATE])


class _NoTok:
    """Smallest tokenizer-like callable (the real one is covered above)."""

    def __call__(self, texts, **kw):
        n = kw["max_length"]
        return {
            "input_ids": torch.ones(len(texts), n, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), n),
        }
