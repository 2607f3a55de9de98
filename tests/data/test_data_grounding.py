"""TARGET_UV, the labels of the `grounding` loss term: read from targets/<camera> of a file and moved
with the image by augmentation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from vla_ft import constants as K
from vla_ft.config import AugmentConfig, DataConfig
from vla_ft.data.dataset import build_datasets
from vla_ft.errors import DataError


def _add_targets(path, shape=None):
    """Give every demo of a hand-built file targets/<camera>: x of the named object = 0.1 * demo +
    0.01 * t, y = -0.5 (agentview) or 0.5 (wrist), no destination (NaN)."""
    with h5py.File(path, "a") as f:
        for name, grp in f["data"].items():
            d, T = int(name.split("_")[1]), len(grp["actions"])
            for c, key in enumerate(("agentview_image", "wrist_image")):
                uv = np.zeros((T, 2, 2), np.float32)
                uv[:, 0, 0] = 0.1 * d + 0.01 * np.arange(T)
                uv[:, 0, 1] = -0.5 + c
                uv[:, 1] = np.nan
                grp.create_dataset(f"targets/{key}", data=uv if shape is None else uv.reshape(shape(T)))
    return path


def test_dataset_batches_carry_target_uv(ours_file, robomimic_file, tmp_path, tokenizer):
    import shutil

    path = _add_targets(ours_file)
    train, _, info = build_datasets(
        DataConfig(paths=[str(path)], val_fraction=0.0, split="random"), tokenizer, seed=0
    )
    assert info.files_without_targets == []
    batch = train.get_batch(np.arange(len(train)))
    uv = batch[K.TARGET_UV]
    assert uv.shape == (len(train), 2, 2, 2)
    d, t = train.sample_demo, train.sample_t
    demo_ids = np.array([int(train.refs[i].name.split("_")[1]) for i in d])
    np.testing.assert_allclose(uv[:, 0, 0, 0].numpy(), 0.1 * demo_ids + 0.01 * t, atol=1e-6)
    assert (uv[:, 1, 0, 1] == 0.5).all() and torch.isnan(uv[:, :, 1]).all()

    plain = shutil.copy(path, tmp_path / "plain.hdf5")
    with h5py.File(plain, "a") as f:
        del f["data/demo_2/targets"]  # one demo without labels: the file counts as unlabelled
    train2, _, info2 = build_datasets(DataConfig(paths=[str(path), str(plain)]), tokenizer, seed=0)
    assert info2.files_without_targets == [str(plain)]
    assert K.TARGET_UV not in train2.get_batch([0, 1])


def test_dataset_rejects_malformed_targets(ours_file, tokenizer):
    path = _add_targets(ours_file, shape=lambda T: (T, 4))
    with pytest.raises(DataError, match=r"ours\.hdf5: demo_0/targets/agentview_image: expected \(T, 2, 2\)"):
        build_datasets(DataConfig(paths=[str(path)]), tokenizer, seed=0)


@pytest.mark.parametrize("mode", ["shift", "affine"])
def test_augmentation_moves_targets_with_the_image(mode):
    from vla_ft.data.augment import Augmenter

    n, size = 16, 32
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(8, 24, n), rng.integers(8, 24, n)
    imgs = torch.zeros(n, 1, 1, 3, size, size, dtype=torch.uint8)
    # a 2x2 bright square, its centre on the corner between four pixels
    for i in range(n):
        imgs[i, 0, 0, :, rows[i] : rows[i] + 2, cols[i] : cols[i] + 2] = 255
    uv = torch.full((n, 1, 2, 2), float("nan"))
    uv[:, 0, 0, 0] = torch.from_numpy((cols + 1) / size * 2 - 1).float()
    uv[:, 0, 0, 1] = torch.from_numpy((rows + 1) / size * 2 - 1).float()
    cfg = (
        AugmentConfig(shift=4) if mode == "shift" else AugmentConfig(shift=0, crop_scale=0.6, rotation_deg=20)
    )
    out = Augmenter(cfg)({K.IMAGES: imgs, K.TARGET_UV: uv}, torch.Generator().manual_seed(3))
    moved = out[K.TARGET_UV]
    assert torch.isnan(moved[:, 0, 1]).all()  # an unknown target stays unknown
    img = out[K.IMAGES][:, 0, 0, 0].float()  # (N, H, W)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mass = img.sum((1, 2))
    cy = (img * ys).sum((1, 2)) / mass  # brightness centroid, pixel index units
    cx = (img * xs).sum((1, 2)) / mass
    got_x = (moved[:, 0, 0, 0] + 1) / 2 * size - 0.5  # back to pixel index units
    got_y = (moved[:, 0, 0, 1] + 1) / 2 * size - 0.5
    keep = (moved[:, 0, 0].abs() < 0.8).all(-1)  # away from the replicated border
    assert keep.sum() >= n // 2
    tol = 0.01 if mode == "shift" else 0.6
    assert (cx - got_x)[keep].abs().max() < tol and (cy - got_y)[keep].abs().max() < tol
    assert not torch.allclose(moved[:, 0, 0], uv[:, 0, 0])  # it did move
