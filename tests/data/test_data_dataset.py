"""TrajectoryDataset / build_datasets on hand-built robomimic, LIBERO and our-layout files."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vla_ft.config import DataConfig
from vla_ft.constants import (
    ACTION,
    ACTION_IS_PAD,
    IMAGES,
    INPUT_KEYS,
    INSTR_IDS,
    INSTR_MASK,
    PROGRESS,
    STATE,
    TARGET_UV,
    TASK_ID,
)
from vla_ft.data.dataset import build_datasets, build_trajectory_datasets
from vla_ft.data.transforms import obs_to_inputs
from vla_ft.errors import DataError


def _cfg(path, **kw):
    return DataConfig(paths=[str(path)], **kw)


def _sample_at(ds, demo_idx, t):
    return ds[int(ds.demo_start[demo_idx]) + t]


@pytest.mark.parametrize(
    "fixture,layout,a_dim,s_dim",
    [
        ("ours_file", "robomimic", 4, 5),
        ("robomimic_file", "robomimic", 7, 5),
        ("libero_file", "libero", 7, 5),
    ],
)
def test_sample_shapes_and_dtypes(request, tokenizer, fixture, layout, a_dim, s_dim):
    path = request.getfixturevalue(fixture)
    train, val, info = build_datasets(_cfg(path, history=2, chunk=3, instruction="do it"), tokenizer, seed=0)
    assert info.action_dim == a_dim and info.state_dim == s_dim
    assert info.image_size == (12, 12) and info.history == 2 and info.chunk == 3
    s = train[0]
    assert set(s) == set(INPUT_KEYS) - {TARGET_UV}  # grounding labels only come from files with targets/
    assert s[IMAGES].dtype == torch.uint8 and s[IMAGES].shape == (2, 2, 3, 12, 12)
    assert s[STATE].dtype == torch.float32 and s[STATE].shape == (2, s_dim)
    assert s[ACTION].dtype == torch.float32 and s[ACTION].shape == (3, a_dim)
    assert s[ACTION_IS_PAD].dtype == torch.bool and s[ACTION_IS_PAD].shape == (3,)
    assert s[INSTR_IDS].dtype == torch.int64 and s[INSTR_IDS].shape == (64,)
    assert s[INSTR_MASK].dtype == torch.int64 and s[INSTR_MASK].shape == (64,)
    assert s[TASK_ID].dtype == torch.int64 and s[TASK_ID].shape == ()
    assert s[PROGRESS].dtype == torch.float32 and s[PROGRESS].shape == ()
    assert info.num_train_samples == len(train)
    assert info.num_train_demos + info.num_val_demos == 5


def test_default_keys_per_layout(ours_file, robomimic_file, libero_file):
    keys = {}
    for p in (ours_file, robomimic_file, libero_file):
        _, _, info = build_trajectory_datasets(_cfg(p, instruction="x"), seed=0)
        keys[p.stem] = (info.image_keys, info.state_keys)
    assert keys["ours"] == (["agentview_image", "wrist_image"], ["ee_pos", "gripper_qpos"])
    assert keys["robomimic"] == (
        ["agentview_image", "robot0_eye_in_hand_image"],
        ["robot0_eef_pos", "robot0_gripper_qpos"],
    )
    assert keys["libero"] == (["agentview_rgb", "eye_in_hand_rgb"], ["ee_pos", "gripper_states"])


def test_chunk_padding_history_and_progress(ours_file, pixel):
    train, _, info = build_trajectory_datasets(
        _cfg(ours_file, history=3, chunk=4, normalization="none"), seed=0
    )
    names = [r.name for r in train.refs]
    d = names.index("demo_0")  # length 6
    last = _sample_at(train, d, 5)
    assert last[ACTION_IS_PAD].tolist() == [False, True, True, True]
    assert (last[ACTION][:, 0] == 5).all()  # padded steps repeat the last action (1000*0 + 5)
    assert last[PROGRESS].item() == pytest.approx(1.0)
    mid = _sample_at(train, d, 2)
    assert mid[ACTION_IS_PAD].tolist() == [False] * 4 and mid[ACTION][:, 1].tolist() == [2, 3, 4, 5]
    assert mid[PROGRESS].item() == pytest.approx(2 / 5)
    first = _sample_at(train, d, 0)  # history before the start repeats frame 0
    assert first[IMAGES][:, 0, 0, 0, 0].tolist() == [pixel(0, 0, 0)] * 3
    assert first[IMAGES][:, 1, 0, 0, 0].tolist() == [pixel(0, 0, 1)] * 3
    assert mid[IMAGES][:, 0, 0, 0, 0].tolist() == [pixel(0, t, 0) for t in (0, 1, 2)]
    assert mid[STATE][:, 0].tolist() == [0.0, 1.0, 2.0]  # raw ee_pos[0] = 100*demo + t
    d3 = names.index("demo_3")
    assert _sample_at(train, d3, 4)[ACTION][0, 0].item() == 3004


def test_actions_and_state_normalized_with_train_stats(ours_file):
    train, _, info = build_trajectory_datasets(_cfg(ours_file, normalization="mean_std"), seed=0)
    norm = info.normalizer
    raw = np.concatenate([train.raw_actions[train.demo_start[d] : train.demo_start[d] + n] for d, n in
                          enumerate(train.demo_len)])  # fmt: skip
    np.testing.assert_allclose(norm.stats["action"]["mean"], raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.stats["action"]["std"], raw.std(0), rtol=1e-6)
    np.testing.assert_allclose(norm.stats["state"]["q99"], np.quantile(train.state, 0.99, axis=0), rtol=1e-6)
    s = train[3]
    t = int(train.sample_t[3])
    start = int(train.demo_start[train.sample_demo[3]])
    want = norm.normalize_action(train.raw_actions[start + t : start + t + 1])
    np.testing.assert_allclose(s[ACTION][0].numpy(), want[0], rtol=1e-6)
    assert s[ACTION][:, 2].abs().max() == 0  # constant action dim -> 0, not NaN
    np.testing.assert_allclose(
        norm.unnormalize_action(s[ACTION])[0].numpy(), train.raw_actions[start + t], atol=1e-3
    )


def test_language_sources(tmp_path, write_h5, tokenizer):
    per_demo = write_h5(tmp_path / "a.hdf5", "ours", tasks=["red", "blue", "red", "red", "red"])
    train, _, info = build_datasets(_cfg(per_demo, val_fraction=0.0), tokenizer, seed=0)
    assert info.task_names == ["red", "blue"]
    assert train.instruction(train.demo_start[1]) == "put the blue cube in the bowl"
    assert train[int(train.demo_start[1])][TASK_ID].item() == 1
    ids = train[int(train.demo_start[1])][INSTR_IDS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "put the blue cube in the bowl"

    libero = write_h5(tmp_path / "b.hdf5", "libero", language="problem_info")
    _, _, info = build_datasets(_cfg(libero, instruction="ignored"), tokenizer, seed=0)
    assert info.instructions == ["open the top drawer"] and info.task_names == ["open the top drawer"]

    with h5py.File(libero, "a") as f:  # instruction stored as a list of characters
        f["data"].attrs["problem_info"] = json.dumps({"language_instruction": list("turn on the stove")})
    _, _, info = build_datasets(_cfg(libero), tokenizer, seed=0)
    assert info.instructions == ["turn on the stove"]

    bare = write_h5(tmp_path / "c.hdf5", "robomimic", language="none")
    _, _, info = build_datasets(_cfg(bare, instruction="lift the cube"), tokenizer, seed=0)
    assert info.instructions == ["lift the cube"]
    with pytest.raises(DataError, match=r"c\.hdf5: demo_0: no language instruction.*data\.instruction"):
        build_datasets(_cfg(bare), tokenizer, seed=0)


def test_mask_splits(libero_file, robomimic_file):
    train, val, info = build_trajectory_datasets(_cfg(robomimic_file, instruction="x"), seed=0)
    assert sorted(r.name for r in val.refs) == ["demo_0", "demo_3"]
    assert sorted(r.name for r in train.refs) == ["demo_1", "demo_2", "demo_4"]
    assert info.num_val_demos == 2
    _, val_r, _ = build_trajectory_datasets(_cfg(robomimic_file, instruction="x", split="random"), seed=0)
    assert len(val_r.refs) == 1  # round(0.1 * 5) -> at least one held out
    with pytest.raises(DataError, match="split=mask but the file has no mask"):
        build_trajectory_datasets(_cfg(libero_file, split="mask"), seed=0)


def test_random_split_by_demo_is_seeded(libero_file):
    def names(seed):
        tr, va, _ = build_trajectory_datasets(_cfg(libero_file, split="random", val_fraction=0.4), seed=seed)
        return [r.name for r in tr.refs], [r.name for r in va.refs]

    a, b = names(1), names(1)
    assert a == b and len(a[1]) == 2 and not set(a[0]) & set(a[1])
    assert {names(s)[1][0] for s in range(6)} != {a[1][0]}  # the seed changes the split
    tr, va, _ = build_trajectory_datasets(_cfg(libero_file, val_fraction=0.0), seed=0)
    assert va is None and len(tr.refs) == 5
    tr, _, _ = build_trajectory_datasets(_cfg(libero_file, val_fraction=0.0, max_demos=2), seed=0)
    assert [r.name for r in tr.refs] == ["demo_0", "demo_1"]


def test_lazy_equals_cached_and_workers(ours_file, tokenizer):
    ram, _, _ = build_datasets(_cfg(ours_file, history=2, cache_images="ram"), tokenizer, seed=0)
    lazy, _, _ = build_datasets(_cfg(ours_file, history=2, cache_images="lazy"), tokenizer, seed=0)
    assert ram.image_cache is not None and lazy.image_cache is None
    lazy[0]  # the parent opens a handle before the fork: workers must not reuse it
    idx = list(range(len(ram)))
    ref = ram.get_batch(idx)
    for workers, collate in ((0, None), (2, None), (2, lazy.collate_fn)):
        loader = DataLoader(lazy, batch_size=7, num_workers=workers, shuffle=False, collate_fn=collate)
        got = {k: torch.cat([b[k] for b in loader]) for k in ref}
        for k in ref:
            assert torch.equal(got[k], ref[k]), (workers, k)
    lazy.close()


def test_dataset_uses_the_obs_transform(ours_file, pixel):
    """A stored frame fed through obs_to_inputs as a live observation gives the sample's tensors."""
    train, _, info = build_trajectory_datasets(_cfg(ours_file, image_size=8), seed=0)
    i = int(train.demo_start[2]) + 3
    d = int(train.sample_demo[i])
    live = {
        "agentview_image": np.full((12, 12, 3), pixel(int(train.refs[d].name[-1]), 3, 0), np.uint8),
        "wrist_image": np.full((12, 12, 3), pixel(int(train.refs[d].name[-1]), 3, 1), np.uint8),
        "ee_pos": train.state[i, :3],
        "gripper_qpos": train.state[i, 3:],
    }
    out = obs_to_inputs(live, info.obs_spec(), info.normalizer)
    s = train[i]
    assert out[IMAGES].shape == (1, 2, 3, 8, 8) and torch.equal(out[IMAGES], s[IMAGES])
    assert torch.equal(out[STATE], s[STATE])


def test_multi_file_mixing_weights(tmp_path, write_h5):
    a = write_h5(tmp_path / "a.hdf5", "ours", lengths=(10, 10, 10, 10), tasks=["a"] * 4)
    b = write_h5(tmp_path / "b.hdf5", "ours", lengths=(5,), tasks=["b"])
    cfg = DataConfig(paths=[str(a), str(b)], weights=[1.0, 3.0], val_fraction=0.0)
    train, _, info = build_trajectory_datasets(cfg, seed=0)
    assert info.task_names == ["a", "b"] and len(train) == 45
    order = torch.cat([train.make_sampler(seed=0).epoch_order(e) for e in range(20)])
    share_b = (torch.from_numpy(train.sample_file)[order] == 1).float().mean().item()
    assert share_b == pytest.approx(0.75, abs=0.05)
    with pytest.raises(DataError, match="action dims differ"):
        build_trajectory_datasets(
            DataConfig(paths=[str(a), str(write_h5(tmp_path / "c.hdf5", "robomimic"))]), 0
        )
