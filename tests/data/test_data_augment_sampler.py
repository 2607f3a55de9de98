"""Augmenter (batched, deterministic, off = identity) and ResumableSampler (pure f(seed, epoch))."""

import pytest
import torch

from vla_ft.config import AugmentConfig
from vla_ft.constants import ACTION, IMAGES
from vla_ft.data.augment import Augmenter, random_shift
from vla_ft.data.sampler import ResumableSampler


def _batch(b=4, t=2, k=2, h=16, w=16):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (b, t, k, 3, h, w), generator=g, dtype=torch.uint8)
    return {IMAGES: imgs, ACTION: torch.zeros(b, 4, 7)}


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(shift=4),
        AugmentConfig(shift=0, crop_scale=0.7, rotation_deg=10),
        AugmentConfig(shift=2, color_jitter=0.4),
    ],
)
def test_augment_shapes_determinism_no_mutation(cfg):
    batch = _batch()
    before = batch[IMAGES].clone()
    aug = Augmenter(cfg)
    out = aug(batch, _gen())
    assert out is not batch and out[ACTION] is batch[ACTION]
    assert torch.equal(batch[IMAGES], before)  # the input batch is untouched
    assert out[IMAGES].dtype == torch.uint8 and out[IMAGES].shape == before.shape
    assert not torch.equal(out[IMAGES], before)
    assert torch.equal(aug(batch, _gen())[IMAGES], out[IMAGES])
    assert not torch.equal(aug(batch, _gen(2))[IMAGES], out[IMAGES])


def test_disabled_is_identity():
    batch = _batch()
    out = Augmenter(AugmentConfig(enabled=False, color_jitter=0.5))(batch, _gen())
    assert out is not batch and out[IMAGES] is batch[IMAGES]


def test_shift_is_an_integer_translation_with_replicated_edges():
    x = torch.arange(36, dtype=torch.uint8).reshape(1, 1, 6, 6).repeat(50, 1, 1, 1)  # (N, 1, H, W)
    out = random_shift(x, 2, _gen())
    for n in range(50):  # each output equals the input shifted by some (dy, dx) in [-2, 2], edges clamped
        ok = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                r = (torch.arange(6) + dy).clamp(0, 5)
                c = (torch.arange(6) + dx).clamp(0, 5)
                ok |= torch.equal(out[n, 0], x[n, 0][r][:, c])
        assert ok


def test_history_frames_share_one_draw():
    imgs = torch.randint(0, 256, (3, 1, 1, 3, 16, 16), dtype=torch.uint8).repeat(1, 3, 1, 1, 1, 1)
    out = Augmenter(AugmentConfig(shift=4, color_jitter=0.5, crop_scale=0.8))({IMAGES: imgs}, _gen())[IMAGES]
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_sampler_pure_function_of_seed_and_epoch():
    s = ResumableSampler(100, seed=3)
    a = list(s)
    assert sorted(a) == list(range(100))
    assert list(ResumableSampler(100, seed=3)) == a
    s.set_epoch(1)
    b = list(s)
    assert b != a and sorted(b) == list(range(100))
    assert list(ResumableSampler(100, seed=4)) != a


def test_sampler_resume_skips_to_position():
    s = ResumableSampler(50, seed=0, weights=torch.rand(50))
    s.set_epoch(2)
    full = list(s)
    s.set_position(2, 17)
    assert list(s) == full[17:]
    assert list(s) == full  # the next iteration starts the epoch from 0 again
    assert s.state_dict() == {"epoch": 2, "index": 0, "seed": 0}


def test_sampler_ranks_partition_the_epoch():
    ranks = [list(ResumableSampler(10, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)
    assert set(sum(ranks, [])) == set(range(10))
    with pytest.raises(ValueError, match="rank 3 is outside world_size 3"):
        ResumableSampler(10, seed=0, rank=3, world_size=3)
