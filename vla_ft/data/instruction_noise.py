"""Wording noise for training instructions (``data.augment.instruction_noise``).

A policy fine-tuned on a few instruction templates can learn the templates' exact character
layout instead of the words that matter (colors, objects), and then fail on a wording it never saw.
With ``instruction_noise: p`` a training sample's instruction is, with probability ``p``, one of
``VARIANTS`` fixed variants of it with one or two made-up words (2-7 random lowercase letters)
inserted at random word boundaries: the meaning is unchanged, so the policy learns to act on the
instruction's words and to ignore ones it does not know. Nothing about other wordings (synonyms,
evaluation paraphrases) goes in, so an evaluation on unseen paraphrases stays unseen.

The variants are drawn once from the run's seed and tokenized with the other instructions; which
variant a sample gets is a hash of its index, so a batch is the same on every run, worker count
and resume. Validation and evaluation read the instructions as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VARIANTS = 16  # noisy variants per distinct instruction


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: well-mixed 64-bit hashes of (consecutive) uint64 indices."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def noisy_variants(text: str, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` copies of ``text`` with 1-2 made-up words inserted at random word boundaries."""
    out = []
    for _ in range(n):
        words = text.split()
        for _ in range(int(rng.integers(1, 3))):
            letters = rng.integers(0, 26, int(rng.integers(2, 8)))
            words.insert(int(rng.integers(0, len(words) + 1)), "".join(chr(97 + int(c)) for c in letters))
        out.append(" ".join(words))
    return out


@dataclass
class NoisyTokens:
    """Tokenized variants of every instruction and the probability a sample reads one."""

    p: float
    ids: torch.Tensor  # int64 (n_instructions, VARIANTS, L)
    mask: torch.Tensor  # int64 (n_instructions, VARIANTS, L)

    def apply(
        self, sample: np.ndarray, instr: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's ``ids``/``mask`` with the noisy variant for the samples whose hash says so.

        Args:
            sample: (B,) dataset indices of the samples (the hash's input).
            instr: (B,) their instruction indices.
        """
        h = _splitmix64(sample.astype(np.uint64))
        use = torch.from_numpy((h >> np.uint64(40)).astype(np.float64) / (1 << 24) < self.p)
        variant = torch.from_numpy((h % np.uint64(VARIANTS)).astype(np.int64))
        ids = torch.where(use[:, None], self.ids[instr, variant], ids)
        mask = torch.where(use[:, None], self.mask[instr, variant], mask)
        return ids, mask


def build_noisy_tokens(instructions: list[str], p: float, seed: int, tokenize) -> NoisyTokens:
    """Draw and tokenize the variants (``tokenize(texts) -> Tokens``) for ``instructions``."""
    rng = np.random.default_rng([seed, 0x1A57])  # its own stream: other draws of the seed stay put
    texts = [v for text in instructions for v in noisy_variants(text, VARIANTS, rng)]
    tokens = tokenize(texts)
    n, length = len(instructions), tokens.ids.shape[-1]
    return NoisyTokens(p, tokens.ids.view(n, VARIANTS, length), tokens.mask.view(n, VARIANTS, length))
