"""``data.augment.instruction_noise``: made-up words in some training instructions, never in validation."""

import numpy as np
import pytest
import torch

from vla_ft.config import AugmentConfig, DataConfig
from vla_ft.constants import INSTR_IDS
from vla_ft.data.dataset import build_datasets
from vla_ft.data.instruction_noise import VARIANTS, noisy_variants
from vla_ft.errors import ConfigError

TEXT = "put the blue cube in the bowl"


def test_variants_keep_every_word_in_order_and_add_one_or_two():
    for variant in noisy_variants(TEXT, 50, np.random.default_rng(0)):
        words = variant.split()
        assert 1 <= len(words) - len(TEXT.split()) <= 2
        extra = list(words)
        for w in TEXT.split():  # the original words, in order, once the made-up ones are skipped
            extra = extra[extra.index(w) + 1 :] if w in extra else pytest.fail(f"{w!r} lost in {variant!r}")
        added = [w for w in words if w not in TEXT.split()]
        assert all(w.isalpha() and w.islower() and 2 <= len(w) <= 7 for w in added)


def test_out_of_range_probability_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.augment.instruction_noise=1.5.*probability in \[0, 1\]"):
        AugmentConfig(instruction_noise=1.5)


def _texts(ds, tokenizer):
    return [tokenizer.decode(ds[i][INSTR_IDS], skip_special_tokens=True) for i in range(len(ds))]


def test_training_samples_read_noisy_variants_validation_reads_the_instructions(
    tmp_path, write_h5, tokenizer
):
    path = write_h5(tmp_path / "a.hdf5", "ours", tasks=["blue"] * 5)  # every demo: TEXT

    def build(p, seed=0):
        cfg = DataConfig(paths=[str(path)], val_fraction=0.4, augment=AugmentConfig(instruction_noise=p))
        return build_datasets(cfg, tokenizer, seed=seed)

    clean_train, clean_val, _ = build(0.0)
    assert set(_texts(clean_train, tokenizer)) == {TEXT}
    train, val, _ = build(0.5)
    texts = _texts(train, tokenizer)
    noisy = [t for t in texts if t != TEXT]
    assert 0.3 < len(noisy) / len(texts) < 0.7  # about half the samples
    assert 4 <= len(set(noisy)) <= VARIANTS  # several variants, each TEXT plus made-up words
    assert all(len(t.split()) > len(TEXT.split()) for t in noisy)
    assert set(_texts(val, tokenizer)) == {TEXT}  # validation is never noised
    assert texts == _texts(build(0.5)[0], tokenizer)  # the same samples, variants: reproducible
    assert texts != _texts(build(0.5, seed=1)[0], tokenizer)  # another seed draws other variants
    batch = train.get_batch(np.arange(len(train)))  # batched fetch == per-sample fetch
    assert torch.equal(batch[INSTR_IDS], torch.stack([train[i][INSTR_IDS] for i in range(len(train))]))
    assert set(_texts(build(1.0)[0], tokenizer)).isdisjoint({TEXT})
