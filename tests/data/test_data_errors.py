"""Bad trajectory files: each gives one DataError naming the file, demo and key (no h5py internals)."""

import h5py
import numpy as np
import pytest

from vla_ft.config import DataConfig
from vla_ft.data.dataset import build_trajectory_datasets
from vla_ft.errors import DataError


def _build(path, **kw):
    return build_trajectory_datasets(DataConfig(paths=[str(path)], **kw), seed=0)


def _raises(path, pattern, **kw):
    with pytest.raises(DataError) as exc:
        _build(path, **kw)
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert "h5py" not in msg and "errno" not in msg.lower(), msg
    assert exc.value.__cause__ is None or not isinstance(exc.value.__cause__, DataError)
    import re

    assert re.search(pattern, msg), msg
    return msg


def test_missing_file_empty_and_not_hdf5(tmp_path):
    _raises(tmp_path / "nope.hdf5", "file not found")
    (tmp_path / "empty.hdf5").write_bytes(b"")
    _raises(tmp_path / "empty.hdf5", "empty file")
    (tmp_path / "text.hdf5").write_text("robot demos, honest\n" * 100)
    _raises(tmp_path / "text.hdf5", "not an HDF5 file")


def test_truncated_file(tmp_path, write_h5):
    good = write_h5(tmp_path / "good.hdf5", "ours", lengths=(40, 40), hw=(32, 32))
    data = good.read_bytes()
    bad = tmp_path / "truncated.hdf5"
    bad.write_bytes(data[: len(data) // 2])
    _raises(bad, "truncated or corrupt")


def test_corrupt_bytes_inside_file(tmp_path, write_h5):
    good = write_h5(tmp_path / "good.hdf5", "ours", lengths=(40,), hw=(32, 32))
    data = bytearray(good.read_bytes())
    data[2048:6144] = b"\xff" * 4096  # object headers / B-tree nodes overwritten
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt|missing|no 'data' group"):
        _build(bad, cache_images="ram")


def test_missing_data_group_and_no_demos(tmp_path):
    p = tmp_path / "nodata.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("demos")
    _raises(p, "no 'data' group")
    with h5py.File(p, "w") as f:
        f.create_group("data")
    _raises(p, "holds no demos")


def test_missing_obs_key(tmp_path, write_h5):
    p = write_h5(
        tmp_path / "f.hdf5", "ours", mutate=lambda n, a: a.pop("obs/gripper_qpos") if n == "demo_2" else None
    )
    msg = _raises(p, r"demo_2/obs/gripper_qpos: missing \(obs has: agentview_image, ee_pos, wrist_image\)")
    assert "data.image_keys/state_keys" in msg
    _raises(
        write_h5(tmp_path / "g.hdf5", "ours"), "demo_0/obs/joint_states: missing", state_keys=["joint_states"]
    )


def test_missing_actions(tmp_path, write_h5):
    p = write_h5(tmp_path / "f.hdf5", "ours", mutate=lambda n, a: a.pop("actions") if n == "demo_1" else None)
    _raises(p, "demo_1/actions: missing actions dataset; set data.action_key")


def _shorten(key, name="demo_3"):
    def mutate(n, arrays):
        if n == name:
            arrays[key] = arrays[key][:-1]

    return mutate


def test_length_mismatch(tmp_path, write_h5):
    p = write_h5(tmp_path / "f.hdf5", "ours", mutate=_shorten("obs/wrist_image"))
    _raises(p, r"demo_3/obs/wrist_image: 6 steps but actions has 7")
    p = write_h5(tmp_path / "g.hdf5", "ours", mutate=_shorten("obs/ee_pos"))
    _raises(p, r"demo_3/obs/ee_pos: 6 steps but actions has 7")


def test_images_not_uint8_hwc(tmp_path, write_h5):
    def chw(n, arrays):
        arrays["obs/agentview_image"] = np.ascontiguousarray(
            arrays["obs/agentview_image"].transpose(0, 3, 1, 2)
        )

    _raises(
        write_h5(tmp_path / "chw.hdf5", "ours", mutate=chw),
        r"demo_0/obs/agentview_image: expected uint8 images",
    )

    def floats(n, arrays):
        arrays["obs/wrist_image"] = arrays["obs/wrist_image"].astype(np.float32) / 255

    _raises(write_h5(tmp_path / "f32.hdf5", "ours", mutate=floats), r"demo_0/obs/wrist_image: .*float32")


def _nan(n, arrays):
    if n in ("demo_1", "demo_4"):
        arrays["actions"][2, 1] = np.nan if n == "demo_1" else np.inf


def test_nan_actions_error_or_skip(tmp_path, write_h5):
    p = write_h5(tmp_path / "nan.hdf5", "ours", mutate=_nan)
    _raises(p, r"demo_1/actions: contains NaN/Inf; fix the file or set data.bad_demos=skip")
    with pytest.warns(
        UserWarning, match=r"skipped 2 of 5 demos .*demo_1/actions: NaN/Inf, demo_4/actions: NaN/Inf"
    ):
        train, val, _ = _build(p, bad_demos="skip", val_fraction=0.0)
    assert sorted(r.name for r in train.refs) == ["demo_0", "demo_2", "demo_3"]
    assert np.isfinite(train.actions).all()


def test_mask_names_unknown_demo(tmp_path, write_h5):
    p = write_h5(tmp_path / "m.hdf5", "ours")
    with h5py.File(p, "a") as f:
        f.create_dataset("mask/valid", data=np.array([b"demo_0", b"demo_77"]))
    _raises(p, r"mask/valid: names demos not in data/: demo_77")


def test_mixed_image_sizes_need_image_size(tmp_path, write_h5):
    a = write_h5(tmp_path / "a.hdf5", "ours", hw=(12, 12))
    b = write_h5(tmp_path / "b.hdf5", "ours", hw=(16, 16))
    with pytest.raises(DataError, match=r"image sizes differ.*set data.image_size"):
        build_trajectory_datasets(DataConfig(paths=[str(a), str(b)]), seed=0)
    train, _, info = build_trajectory_datasets(DataConfig(paths=[str(a), str(b)], image_size=10), seed=0)
    assert train.get_batch([0, len(train) - 1])["observation.images"].shape[-2:] == (10, 10)


def _damage_chunk(path, dataset, index):
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(index)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 4)
        fh.write(b"\xa5" * max(16, info.size // 2))


def test_damaged_image_chunk_is_an_error_at_start_or_a_skipped_demo(tmp_path, write_h5):
    path = write_h5(tmp_path / "chunks.hdf5", "ours", lengths=(10, 10, 10), hw=(16, 16))
    with h5py.File(path, "r+") as h5:  # gzip-chunked per frame, as DemoWriter stores images
        key = "data/demo_1/obs/wrist_image"
        frames = h5[key][()]
        del h5[key]
        h5.create_dataset(key, data=frames, chunks=(1, 16, 16, 3), compression="gzip")
    _damage_chunk(path, "data/demo_1/obs/wrist_image", 6)
    _raises(path, r"demo_1/obs/wrist_image: cannot read.*data.bad_demos=skip", cache_images="ram")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 demos .*demo_1/obs/wrist_image: unreadable"):
        train, val, info = _build(path, bad_demos="skip", cache_images="lazy", val_fraction=0.0)
    assert sorted(r.name for r in train.refs) == ["demo_0", "demo_2"] and val is None
    for i in range(len(train)):  # the damaged demo is gone: every lazy read succeeds
        train[i]
