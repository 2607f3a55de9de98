"""The trunk window (``model.extra.trunk_window``): the policy's sequence reads its instruction
tokens through a causal sliding window, while image tokens, state and action queries attend as
before."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_batch, make_info

from vla_ft import constants as C
from vla_ft.config import ModelConfig
from vla_ft.errors import ConfigError
from vla_ft.models import VLAPolicy, load_vla
from vla_ft.models.language import window_mask

FILM = {"film": True, "keypoints": 8}


def _policy(trunk_window: int, seed: int = 0) -> VLAPolicy:
    torch.manual_seed(seed)
    return load_vla(
        ModelConfig(preset="tiny", extra={**FILM, "trunk_window": trunk_window}), make_info()
    ).eval()


def _hidden(policy: VLAPolicy, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return policy(batch)[C.OUT_HIDDEN]


def test_a_span_window_masks_only_pairs_inside_the_span():
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 7] = 0  # a padding token inside the span
    keep = window_mask(mask, 2, span=(3, 8))[0, 0]
    causal = torch.tril(torch.ones(10, 10, dtype=torch.bool)) & mask.bool() | torch.eye(10, dtype=torch.bool)
    inside = torch.zeros(10, dtype=torch.bool)
    inside[3:8] = True
    both = inside[:, None] & inside[None, :]
    assert torch.equal(keep[~both], causal[~both])  # outside the span: plain causal attention
    assert keep[5, 4] and keep[5, 5] and not keep[5, 3]  # inside: itself and the token before it
    assert keep[9, 0] and keep[9, 3] and not keep[9, 7]  # a query after the span sees all but padding
    assert keep[4, 0] and keep[4, 2]  # an instruction token sees every token before the span
    assert torch.equal(window_mask(mask, 100, span=(3, 8)), causal[None, None])  # wide: causal


def test_a_window_wider_than_the_instruction_is_the_plain_policy():
    batch = make_batch(make_info())
    plain, wide = _policy(0), _policy(1000)
    wide.load_state_dict(plain.state_dict())
    _, attn, _, _ = plain._sequence(batch)
    real = attn.bool()  # padding positions' outputs are ignored (a padding query sees itself here)
    torch.testing.assert_close(_hidden(wide, batch)[real], _hidden(plain, batch)[real], rtol=0, atol=0)
    assert not real.all()  # sample 0's instruction is padded


def test_instruction_tokens_see_a_window_and_the_action_queries_everything():
    policy = _policy(3)
    info = make_info()
    batch = make_batch(info)
    other = dict(batch)
    ids = batch[C.INSTR_IDS].clone()
    ids[:, 0] = ids[:, 0] % 200 + 3 + 1  # another first instruction token
    other[C.INSTR_IDS] = ids
    a, b = _hidden(policy, batch), _hidden(policy, other)
    n_instr = batch[C.INSTR_IDS].shape[1]
    start = a.shape[1] - info.chunk - 1 - n_instr
    diff = (a - b).abs().amax(-1)[1]  # sample 1: a full-length instruction (no padding)
    # two layers of a 3-token window: a token sees at most 4 instruction tokens back
    assert diff[start] > 1e-4 and diff[start + 4] > 1e-4
    assert diff[start + 5 : start + n_instr].max() == 0
    assert diff[:start].max() == 0  # image and state tokens come before the instruction
    assert diff[-info.chunk - 1 :].min() > 1e-4  # the action queries and readout see all of it


def test_trunk_window_is_checked_and_kept_in_the_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"model.extra.trunk_window=-1: must be >= 0"):
        _policy(-1)
    with pytest.raises(ConfigError, match="trunk_window"):
        load_vla(ModelConfig(preset="bc-cnn", extra={"trunk_window": 4}), make_info())
    _policy(0).save_pretrained(tmp_path / "base")
    # a readout knob: fine-tuning a checkpoint with it applies it, and the new checkpoint keeps it
    tuned = load_vla(ModelConfig(pretrained=str(tmp_path / "base"), extra={"trunk_window": 6}), make_info())
    assert tuned.backbone.trunk_window == 6
    tuned.save_pretrained(tmp_path / "tuned")
    assert VLAPolicy.from_pretrained(tmp_path / "tuned").backbone.trunk_window == 6
    assert VLAPolicy.from_pretrained(tmp_path / "base").backbone.trunk_window == 0
