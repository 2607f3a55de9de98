"""Normalizer: statistics against numpy, every mode's round trip, constant dims, persistence."""

import numpy as np
import pytest
import torch

from vla_ft.data.normalize import Normalizer, compute_stats
from vla_ft.errors import CheckpointError


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    action = rng.normal(2.0, 3.0, size=(5000, 4)).astype(np.float32)
    action[:, 3] = 0.25  # constant dimension
    state = rng.uniform(-5, 9, size=(5000, 6)).astype(np.float32)
    return action, state


def test_stats_match_numpy(arrays):
    action, _ = arrays
    st = compute_stats(action)
    a64 = action.astype(np.float64)
    np.testing.assert_allclose(st["mean"], a64.mean(0))
    np.testing.assert_allclose(st["std"], a64.std(0))
    np.testing.assert_array_equal(st["min"], a64.min(0))
    np.testing.assert_array_equal(st["max"], a64.max(0))
    np.testing.assert_allclose(st["q01"], np.percentile(a64, 1, axis=0))
    np.testing.assert_allclose(st["q99"], np.percentile(a64, 99, axis=0))


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile", "none"])
def test_round_trip_numpy_and_torch(arrays, mode):
    action, state = arrays
    norm = Normalizer.from_arrays(mode, action, state)
    for key, x in (("action", action), ("state", state)):
        y = norm.normalize(key, x)
        assert y.dtype == np.float32 and np.isfinite(y).all()
        yt = norm.normalize(key, torch.from_numpy(x))
        assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
        np.testing.assert_allclose(yt.numpy(), y, rtol=1e-5, atol=1e-6)
        back = norm.unnormalize(key, y)
        inside = np.ones(len(x), bool)
        if mode == "quantile":  # clipped outside the 1-99% range: exact only inside
            st = norm.stats[key]
            inside = ((x >= st["q01"]) & (x <= st["q99"])).all(1)
        np.testing.assert_allclose(back[inside], x[inside], rtol=1e-5, atol=1e-4)
    if mode == "min_max":
        y = norm.normalize_state(state)
        assert y.min() == pytest.approx(-1.0) and y.max() == pytest.approx(1.0)
    if mode == "quantile":
        assert np.abs(norm.normalize_action(action)).max() <= 1.0
    if mode == "mean_std":
        y = norm.normalize_action(action)
        np.testing.assert_allclose(y[:, :3].mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(y[:, :3].std(0), 1, atol=1e-4)


def test_constant_dim_maps_to_zero_and_back(arrays):
    action, state = arrays
    for mode in ("mean_std", "min_max", "quantile"):
        norm = Normalizer.from_arrays(mode, action, state)
        y = norm.normalize_action(action)
        assert (y[:, 3] == 0).all()
        assert (norm.unnormalize_action(y)[:, 3] == np.float32(0.25)).all()


def test_nearly_constant_dim_is_not_amplified():
    """A dimension with std ~1e-5 (finger lag on gripper-open data) stays at its tiny raw size."""
    rng = np.random.default_rng(1)
    state = np.stack([rng.normal(0, 0.1, 2000), 0.05 - np.abs(rng.normal(0, 1e-5, 2000))], 1).astype(
        np.float32
    )
    for mode in ("mean_std", "min_max", "quantile"):
        norm = Normalizer.from_arrays(mode, state[:, :1], state)
        y = norm.normalize_state(state)
        assert np.abs(y[:, 1]).max() < 1e-3, mode  # scale 1: x - center, not (x - center) / 1e-5
        assert y[:, 0].std() > 0.2, mode  # the real dimension (std 0.1) is still scaled up
        np.testing.assert_allclose(norm.unnormalize_state(y)[:, 1], state[:, 1], atol=1e-7)


def test_save_load_json(tmp_path, arrays):
    norm = Normalizer.from_arrays("quantile", *arrays)
    path = norm.save(tmp_path)
    assert path.name == "normalization.json"
    back = Normalizer.load(tmp_path)
    assert back.mode == "quantile"
    x = torch.randn(2, 3, 4)
    assert torch.equal(back.unnormalize_action(x), norm.unnormalize_action(x))
    assert Normalizer.from_json(norm.to_json()).to_dict() == norm.to_dict()
    with pytest.raises(CheckpointError, match="normalization file not found"):
        Normalizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"mode": "mean_std"}')
    with pytest.raises(CheckpointError, match="bad.json: not a valid normalization file"):
        Normalizer.load(tmp_path / "bad.json")


def test_wrong_dim_and_unknown_key(arrays):
    norm = Normalizer.from_arrays("mean_std", arrays[0])
    with pytest.raises(ValueError, match="action has 3 dims but the normalizer was fit on 4"):
        norm.normalize_action(np.zeros((2, 3), np.float32))
    with pytest.raises(KeyError, match="no statistics for 'state'"):
        norm.normalize_state(np.zeros((2, 3), np.float32))
