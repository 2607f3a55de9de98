"""Property-based bad input (hypothesis): random overrides, truncation points and dataset mutations.

Whatever the input, the library either accepts it or raises one VLAFTError naming the key or the
file; no other exception type escapes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from cases import write_reach_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vla_ft.config import Config, load_config
from vla_ft.data.dataset import build_trajectory_datasets
from vla_ft.errors import CheckpointError, DataError, VLAFTError
from vla_ft.models import VLAPolicy

# 40 examples per property in CI; VLA_FT_EXAMPLES=500 for a longer search
SETTINGS = settings(
    max_examples=int(os.environ.get("VLA_FT_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (``train.lr``, ``data.augment.crop``, ...)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _keys(hint, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


KEYS = _keys(Config)
VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "no", "[]", "[1, 2]", "{a: 1}", "[[", "}", "auto", "fp8", "-1"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)


@SETTINGS
@given(key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20)), value=VALUES)
def test_any_override_is_accepted_or_one_config_error_naming_the_key(key, value):
    try:
        load_config("pick_place.yaml", [f"{key}={value}"])
    except VLAFTError as exc:
        msg = str(exc)
        assert "\n" not in msg and "Traceback" not in msg
        name = key.split("=")[0].strip()
        if name in KEYS:  # a known key: the message names it (or the section it sits in)
            assert name in msg or name.rsplit(".", 1)[0] in msg or "override" in msg, msg


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    return write_reach_file(tmp_path_factory.mktemp("prop") / "reach.hdf5", demos=6, steps=12)


def _build(path: Path, **kw):
    from vla_ft.config import DataConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_trajectory_datasets(DataConfig(paths=[str(path)], **kw), seed=0)


@SETTINGS
@given(fraction=st.floats(0.0, 0.999), cache=st.sampled_from(["ram", "lazy"]))
def test_an_hdf5_file_cut_anywhere_is_one_data_error(good_file, tmp_path_factory, fraction, cache):
    data = good_file.read_bytes()
    bad = tmp_path_factory.mktemp("cut") / "cut.hdf5"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(DataError) as err:
        train, val, _ = _build(bad, cache_images=cache)
        for ds in (train, val):  # lazily read files fail on the first read of a lost chunk
            for i in range(len(ds or [])):
                ds[i]
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


MUTATIONS = {
    "dtype": lambda a, rng: a.astype(
        rng.choice([np.float16, np.float64, np.int8, np.int64, np.uint8, np.bool_])
    ),
    "shorter": lambda a, rng: a[: max(0, len(a) - int(rng.integers(1, len(a) + 1)))],
    "drop_dim": lambda a, rng: a.reshape(len(a), -1)[:, 0] if a.ndim > 1 else a[:, None],
    "extra_dim": lambda a, rng: a[..., None],
    "wider": lambda a, rng: np.concatenate([a, a[..., :1]], axis=-1),
    "transposed": lambda a, rng: np.ascontiguousarray(np.moveaxis(a, -1, 1)) if a.ndim > 2 else a.T.copy(),
    "empty": lambda a, rng: a[:0],
}


@SETTINGS
@given(
    where=st.sampled_from(
        ["actions", "obs/ee_pos", "obs/gripper_qpos", "obs/agentview_image", "obs/wrist_image"]
    ),
    demo=st.integers(0, 5),
    mutation=st.sampled_from(sorted(MUTATIONS)),
    seed=st.integers(0, 2**16),
)
def test_a_mutated_dataset_is_accepted_or_one_data_error_naming_it(
    good_file, tmp_path_factory, where, demo, mutation, seed
):
    bad = tmp_path_factory.mktemp("mut") / "mutated.hdf5"
    shutil.copy(good_file, bad)
    key = f"data/demo_{demo}/{where}"
    with h5py.File(bad, "r+") as h5:
        arr = MUTATIONS[mutation](h5[key][()], np.random.default_rng(seed))
        del h5[key]
        h5.create_dataset(key, data=arr)
    try:
        train, _, _ = _build(bad)
        train[0]
    except DataError as exc:
        msg = str(exc)
        assert str(bad) in msg and "\n" not in msg, msg


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> Path:
    from model_helpers_for_battery import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@SETTINGS
@given(fraction=st.floats(0.0, 0.9999), manifest=st.booleans())
def test_weights_cut_anywhere_are_one_checkpoint_error(good_ckpt, tmp_path_factory, fraction, manifest):
    ckpt = tmp_path_factory.mktemp("cut") / "ckpt"
    shutil.copytree(good_ckpt, ckpt)
    if not manifest:
        (ckpt / "manifest.json").unlink()
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError) as err:
        VLAPolicy.from_pretrained(ckpt)
    assert "model.safetensors" in str(err.value) and "\n" not in str(err.value)
