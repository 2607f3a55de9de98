"""LeRobotDataset v3 roots in data.paths, checked against what LeRobot's own reader returned.

tests/fixtures/lerobot/ holds two datasets written by lerobot 0.6.1 (the same 3 episodes in video
and in image mode) and ``dataset_expected.npz``: every frame's state, action, indices and task as
``LeRobotDataset(...)[i]`` returned them, the images as lerobot decoded them (``video/<camera>``,
``image/<camera>``) and the source frames (``raw/<camera>``).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_ft.config import DataConfig
from vla_ft.constants import ACTION, ACTION_IS_PAD, IMAGES, INSTR_IDS, STATE, TASK_ID
from vla_ft.data.dataset import build_trajectory_datasets
from vla_ft.data.lerobot import convert_to_hdf5
from vla_ft.data.reader import scan_file
from vla_ft.errors import ConfigError, DataError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lerobot"
MODES = ("video", "image")
KEYS = ("front_image", "wrist_image")  # observation.images.front / .wrist


def root(mode: str) -> str:
    return str(FIXTURES / f"dataset_v3_{mode}")


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "dataset_expected.npz") as z:
        return {k: z[k] for k in z.files}


def _cfg(path, **kw) -> DataConfig:
    base = dict(split="random", val_fraction=0.0, normalization="none", chunk=8, history=2)
    base.update(kw)
    return DataConfig(paths=[str(p) for p in (path if isinstance(path, list) else [path])], **base)


def _copy(tmp_path: Path, mode: str = "video") -> Path:
    dst = tmp_path / f"ds_{mode}"
    shutil.copytree(root(mode), dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


# ---- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_scan_equals_lerobot(mode, expected):
    scan = scan_file(root(mode), DataConfig(paths=[root(mode)]))
    assert scan.layout == "lerobot_v3"
    assert scan.image_keys == KEYS and scan.state_keys == ("state",) and scan.state_dims == (4,)
    assert [d.length for d in scan.demos] == expected["episode_lengths"].tolist()
    np.testing.assert_array_equal(np.concatenate([d.state for d in scan.demos]), expected["state"])
    np.testing.assert_array_equal(np.concatenate([d.actions for d in scan.demos]), expected["action"])
    tasks = np.concatenate([[d.instruction] * d.length for d in scan.demos])
    assert tasks.tolist() == expected["task"].tolist()
    ep = np.concatenate([[int(d.name.split("_")[1])] * d.length for d in scan.demos])
    np.testing.assert_array_equal(ep, expected["episode_index"])
    for key, feat in zip(KEYS, expected["camera_keys"]):
        frames = np.concatenate([scan.frames.episode(d.name, key) for d in scan.demos])
        assert frames.dtype == np.uint8 and frames.shape == expected[f"raw/{feat}"].shape
        # LeRobot's own decode, bit for bit (same decoder family: PNG / PyAV + libdav1d)
        np.testing.assert_array_equal(frames, expected[f"{mode}/{feat}"])
        diff = np.abs(frames.astype(np.int16) - expected[f"raw/{feat}"])
        if mode == "image":
            assert diff.max() == 0
        else:  # AV1 + 4:2:0 chroma: the fixture README measured mean 2.95 / 2.58 levels
            assert diff.mean() < 4.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", ["ram", "lazy"])
def test_samples_equal_lerobot(mode, cache, expected, tokenizer):
    train, val, info = build_trajectory_datasets(_cfg(root(mode), cache_images=cache), seed=0)
    assert val is None and len(train) == 48
    assert info.image_keys == list(KEYS) and info.task_names == expected["tasks"].tolist()
    b = train.get_batch(np.arange(48))
    ep, t = expected["episode_index"], expected["frame_index"]
    starts = np.concatenate([[0], np.cumsum(expected["episode_lengths"])[:-1]])[ep]
    last = starts + expected["episode_lengths"][ep] - 1
    steps = starts[:, None] + t[:, None] + np.arange(8)  # (48, 8) chunk rows
    np.testing.assert_array_equal(b[ACTION].numpy(), expected["action"][np.minimum(steps, last[:, None])])
    np.testing.assert_array_equal(b[ACTION_IS_PAD].numpy(), steps > last[:, None])
    hist = starts[:, None] + np.maximum(t[:, None] + np.array([-1, 0]), 0)  # (48, 2) history rows
    np.testing.assert_array_equal(b[STATE].numpy(), expected["state"][hist])
    for k, feat in enumerate(expected["camera_keys"]):
        want = expected[f"{mode}/{feat}"][hist]  # (48, 2, H, W, 3)
        np.testing.assert_array_equal(b[IMAGES][:, :, k].permute(0, 1, 3, 4, 2).numpy(), want)
    np.testing.assert_array_equal(b[TASK_ID].numpy(), expected["task_index"])
    assert [train.instruction(i) for i in range(48)] == expected["task"].tolist()


def test_lazy_reads_forward_and_pickles(expected):
    train, _, _ = build_trajectory_datasets(_cfg(root("video"), cache_images="lazy"), seed=0)
    frames = train.frames[0]
    seeks = []
    for name in ("episode_0", "episode_1", "episode_2"):  # file order: one decoder, read forward
        frames.episode(name, "front_image")
        cursor = next(iter(frames._cursors.values()))
        seeks.append(cursor.position)
    assert seeks == sorted(seeks)
    # the same decoder went on from episode to episode: a seek would have reset position first
    seek_calls = []
    orig = type(cursor.container).seek

    class Spy:
        def __init__(self, c):
            self.c = c

        def __getattr__(self, k):
            return getattr(self.c, k)

        def seek(self, *a, **kw):
            seek_calls.append(a)
            return orig(self.c, *a, **kw)

    frames.close()
    frames.episode("episode_0", "front_image")
    cursor = frames._cursors[next(iter(frames._cursors))]
    cursor.container = Spy(cursor.container)
    frames.episode("episode_1", "front_image")
    frames.episode("episode_2", "front_image")
    assert seek_calls == []
    frames.episode("episode_0", "front_image")  # LRU hit: no decode at all
    assert seek_calls == []
    # a DataLoader worker gets a pickled copy without open decoders, and decodes on its own
    clone = pickle.loads(pickle.dumps(train))
    b = clone.get_batch([0, 20, 47])
    np.testing.assert_array_equal(
        b[IMAGES][:, -1, 0].permute(0, 2, 3, 1).numpy(),
        expected["video/observation.images.front"][[0, 20, 47]],
    )


def test_dataloader_workers_match(expected):
    train, _, _ = build_trajectory_datasets(_cfg(root("video"), cache_images="lazy"), seed=0)
    loader = torch.utils.data.DataLoader(
        train, batch_size=16, num_workers=2, collate_fn=train.collate_fn, shuffle=False
    )
    imgs = torch.cat([b[IMAGES][:, -1, 1] for b in loader]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(imgs, expected["video/observation.images.wrist"])


# ---- options: keys, splits, normalization, mixing ------------------------------------------


def test_image_map_and_key_selection():
    cfg = DataConfig(
        paths=[root("image")],
        lerobot_image_map={"observation.images.front": "agentview_image"},
        image_keys=["agentview_image", "observation.images.wrist"],
    )
    scan = scan_file(root("image"), cfg)
    assert scan.image_keys == ("agentview_image", "wrist_image")
    with pytest.raises(DataError, match=r"data.lerobot_image_map names 'observation.images.top'"):
        scan_file(
            root("image"),
            DataConfig(paths=[root("image")], lerobot_image_map={"observation.images.top": "x"}),
        )
    with pytest.raises(DataError, match=r"data.image_keys names 'top_image'.*front_image"):
        scan_file(root("image"), DataConfig(paths=[root("image")], image_keys=["top_image"]))
    with pytest.raises(ConfigError, match="lerobot_image_map"):
        DataConfig(lerobot_image_map={"observation.images.a": "k", "observation.images.b": "k"})


def test_split_by_episode_and_info_splits(tmp_path):
    train, val, info = build_trajectory_datasets(_cfg(root("video"), val_fraction=0.34), seed=3)
    names_t = {r.name for r in train.refs}
    names_v = {r.name for r in val.refs}
    assert not names_t & names_v and len(names_v) == 1 and len(names_t) == 2
    assert len(train) + len(val) == 48
    ds = _copy(tmp_path, "image")
    info_path = ds / "meta" / "info.json"
    meta = json.loads(info_path.read_text())
    meta["splits"] = {"train": "0:2", "valid": "2:3"}
    info_path.write_text(json.dumps(meta))
    train, val, _ = build_trajectory_datasets(_cfg(ds, split="auto"), seed=0)
    assert [r.name for r in train.refs] == ["episode_0", "episode_1"]
    assert [r.name for r in val.refs] == ["episode_2"]


def test_normalization_stats_selectable(expected):
    stats = json.loads((FIXTURES / "dataset_v3_video" / "meta" / "stats.json").read_text())
    _, _, info = build_trajectory_datasets(
        _cfg(root("video"), normalization="mean_std", norm_stats="dataset"), seed=0
    )
    np.testing.assert_allclose(info.normalizer.stats["action"]["mean"], stats["action"]["mean"])
    np.testing.assert_allclose(info.normalizer.stats["state"]["std"], stats["observation.state"]["std"])
    np.testing.assert_allclose(info.normalizer.stats["action"]["q99"], stats["action"]["q99"])
    _, _, own = build_trajectory_datasets(
        _cfg(root("video"), normalization="mean_std", val_fraction=0.34), seed=0
    )
    assert not np.allclose(own.normalizer.stats["action"]["mean"], stats["action"]["mean"])


def test_convert_round_trip_and_mixing(tmp_path, tokenizer):
    out = convert_to_hdf5(root("video"), tmp_path / "conv.hdf5")
    for kw in (dict(cache_images="ram"), dict(cache_images="lazy", val_fraction=0.34)):
        v3_train, v3_val, v3_info = build_trajectory_datasets(_cfg(root("video"), **kw), seed=1)
        h5_train, h5_val, h5_info = build_trajectory_datasets(_cfg(out, **kw), seed=1)
        assert h5_info.image_keys == v3_info.image_keys and h5_info.task_names == v3_info.task_names
        for a, b in ((v3_train, h5_train), (v3_val, h5_val)):
            if a is None:
                assert b is None
                continue
            ba, bb = a.get_batch(np.arange(len(a))), b.get_batch(np.arange(len(b)))
            assert ba.keys() == bb.keys()
            for k in ba:
                torch.testing.assert_close(ba[k], bb[k], rtol=0, atol=0)
    # a v3 root and an HDF5 file in one run, weighted, with instruction tokens
    cfg = _cfg([root("image"), out], weights=[3.0, 1.0], normalization="mean_std")
    train, _, info = build_trajectory_datasets(cfg, seed=0, tokenizer=tokenizer)
    assert train.num_demos == 6 and len(info.task_names) == 3
    w = train.sample_weights()
    assert torch.isclose(w[train.sample_file == 0].sum() / w.sum(), torch.tensor(0.75, dtype=w.dtype))
    b = train.get_batch(np.arange(len(train)))
    assert b[INSTR_IDS].shape[0] == 96 and torch.isfinite(b[ACTION]).all()
    with pytest.raises(DataError, match="norm_stats=dataset needs every"):
        build_trajectory_datasets(_cfg([root("image"), out], norm_stats="dataset"), seed=0)


def test_hub_id_resolves_to_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LEROBOT_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        scan_file("someone/tiny_fixture", DataConfig(paths=["someone/tiny_fixture"]))
    (tmp_path / "cache" / "someone").mkdir(parents=True)
    shutil.copytree(root("image"), tmp_path / "cache" / "someone" / "tiny_fixture")
    scan = scan_file("someone/tiny_fixture", DataConfig(paths=["someone/tiny_fixture"]))
    assert len(scan.demos) == 3


# ---- bad inputs: one DataError each, naming the place and the fix ---------------------------


def _raises(path, pattern, **kw) -> str:
    with pytest.raises(DataError) as exc:
        build_trajectory_datasets(_cfg(path, cache_images="lazy", **kw), seed=0)
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert exc.value.__cause__ is None, msg
    import re

    assert re.search(pattern, msg), msg
    return msg


def test_bad_info_json(tmp_path):
    ds = _copy(tmp_path)
    info = ds / "meta" / "info.json"
    text = info.read_text()
    info.write_text(text[: len(text) // 2])
    _raises(ds, r"meta/info.json: cannot parse.*re-download")
    info.unlink()
    _raises(ds, r"meta/info.json not found: not a LeRobotDataset root")
    meta = json.loads(text)
    meta["codebase_version"] = "v2.1"
    info.write_text(json.dumps(meta))
    msg = _raises(ds, r"codebase_version v2.1: a LeRobotDataset v2")
    assert "convert" in msg and "v3.0" in msg
    meta["codebase_version"] = "v4.0"
    info.write_text(json.dumps(meta))
    _raises(ds, r"codebase_version v4.0 is not v3.x")


def test_feature_missing_from_parquet(tmp_path):
    import pyarrow.parquet as pq

    ds = _copy(tmp_path)
    f = ds / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(f).drop_columns(["observation.state"]), f)
    _raises(
        ds, r"data/chunk-000/file-000.parquet: feature 'observation.state' is in meta/info.json but not in"
    )


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_bad_video_file(tmp_path, damage):
    ds = _copy(tmp_path)
    f = ds / "videos" / "observation.images.wrist" / "chunk-000" / "file-000.mp4"
    if damage == "missing":
        f.unlink()
        _raises(ds, r"videos/observation.images.wrist/chunk-000/file-000.mp4: video file not found")
    elif damage == "garbage":
        f.write_bytes(b"not a video at all " * 200)
        _raises(ds, r"file-000.mp4: cannot decode \(camera observation.images.wrist\)")
    else:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        _raises(ds, r"file-000.mp4: (cannot decode|the episodes need frames up to t=4.700 s.*truncated)")


def test_episode_ranges_mismatch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = _copy(tmp_path, "image")
    f = ds / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    t = pq.read_table(f)
    i = t.column_names.index("dataset_from_index")
    t = t.set_column(i, "dataset_from_index", pa.array([0, 10, 32], pa.int64()))
    j = t.column_names.index("length")
    pq.write_table(t.set_column(j, "length", pa.array([12, 22, 16], pa.int64())), f)
    _raises(ds, r"episode 1: rows 10..31 \(22 frames\) do not match the data files")
    pq.write_table(t, f)  # range 10..32 but length 20
    _raises(ds, r"episode 1: dataset_from_index..dataset_to_index = 10..32 does not hold its length 20")


def test_finetune_trains_on_a_lerobot_root_as_given(tmp_path):
    """The main entry point takes a v3 root in data.paths (before, a path that is not a file counted
    as missing demos): the run trains and writes its checkpoints, and nothing is written into the root."""
    from vla_ft.config import load_config
    from vla_ft.train.finetune import run_finetune
    from vla_ft.train.logging import read_metrics

    overrides = {
        "data.paths": f"[{FIXTURES / 'dataset_v3_video'}]",
        "model.pretrained": "null",
        "model.preset": "tiny",
        # its state is one 'state' vector, no end-effector key: base.yaml's waypoint term is dropped
        "loss.task_terms": "{task_id: 1.0, progress: 1.0}",
        "train.steps": 4,
        "train.warmup_steps": 1,
        "train.batch_size": 8,
        "train.val_every": 2,
        "train.save_every": 4,
        "train.out_dir": str(tmp_path / "runs"),
        "train.run_name": "v3",
        "train.threads": 1,
        "eval.episodes": 0,
        "log.wandb": "disabled",
        "log.progress": "false",
        "log.plots": "false",
        "log.every": 1,
    }
    cfg = load_config("base.yaml", [f"{k}={v}" for k, v in overrides.items()])
    result = run_finetune(cfg)
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    assert (result.run_dir / "last" / "model.safetensors").is_file()
    assert not any(FIXTURES.joinpath("dataset_v3_video").glob("*.hdf5"))
