from collections import namedtuple

import pytest
import torch
from torch import nn

from vla_ft.config import TrainConfig
from vla_ft.train.optim import apply_unfreezing, build_optimizer, build_param_groups, build_scheduler

PI = namedtuple("PI", "module depth num_layers")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vis = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.proj = nn.Linear(4, 4)
        self.embed = nn.Embedding(10, 4)
        self.lang = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def _info(model):
    info = {}
    for name, _ in model.named_parameters():
        if name.startswith("vis."):
            info[name] = PI("vision", int(name.split(".")[1]), 2)
        elif name.startswith("proj"):
            info[name] = PI("projector", 0, 1)
        elif name.startswith("embed"):
            info[name] = PI("language", 0, 4)
        elif name.startswith("lang."):
            info[name] = PI("language", int(name.split(".")[1]) + 1, 4)
        elif name.startswith("norm"):
            info[name] = PI("language", 3, 4)
        else:
            info[name] = PI("heads", 0, 1)
    return info


def _lr_of(groups, name):
    (g,) = [g for g in groups if name in g["param_names"]]
    return g["lr"], g["weight_decay"]


def test_layerwise_decay_and_module_lr_give_expected_group_lrs():
    model = Toy()
    cfg = TrainConfig(lr=1e-3, layer_decay=0.5, module_lr={"heads": 10.0}, weight_decay=0.1, warmup_steps=0)
    groups = build_param_groups(model, _info(model), cfg)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # language: 4 layers (embed depth 0, blocks 1..3); top block depth 3 -> decay^0
    assert _lr_of(groups, "lang.2.weight") == (pytest.approx(1e-3), 0.1)
    assert _lr_of(groups, "lang.0.weight")[0] == pytest.approx(1e-3 * 0.5**2)
    assert _lr_of(groups, "embed.weight") == (pytest.approx(1e-3 * 0.5**3), 0.0)
    # projector sits below the 4 language layers, vision below the projector
    assert _lr_of(groups, "proj.weight")[0] == pytest.approx(1e-3 * 0.5**4)
    assert _lr_of(groups, "vis.1.weight")[0] == pytest.approx(1e-3 * 0.5**5)
    assert _lr_of(groups, "vis.0.weight")[0] == pytest.approx(1e-3 * 0.5**6)
    # heads: top, times the discriminative multiplier; biases and norms without weight decay
    assert _lr_of(groups, "head.weight") == (pytest.approx(1e-2), 0.1)
    assert _lr_of(groups, "head.bias")[1] == 0.0
    assert _lr_of(groups, "norm.weight")[1] == 0.0


def test_warmup_then_linear_matches_seed_formula():
    model = Toy()
    cfg = TrainConfig(lr=1.0, steps=10, warmup_steps=4, schedule="linear")
    groups = build_param_groups(model, _info(model), cfg)
    opt = build_optimizer(groups, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    expected = [t / 4 if t <= 4 else (10 - t) / (10 - 4) for t in range(10)]
    assert lrs == pytest.approx(expected)


def test_cosine_with_floor_and_group_ratios_hold():
    model = Toy()
    cfg = TrainConfig(lr=1.0, steps=20, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, layer_decay=0.5)
    groups = build_param_groups(model, _info(model), cfg)
    opt = build_optimizer(groups, cfg, torch.device("cpu"))
    sched = build_scheduler(opt, cfg)
    initial = [g["initial_lr"] for g in opt.param_groups]
    for _ in range(20):
        opt.step()
        sched.step()
    final = [g["lr"] for g in opt.param_groups]
    ratios = [f / i for f, i in zip(final, initial)]
    assert ratios == pytest.approx([0.1] * len(ratios))


def test_progressive_unfreezing_top_first():
    model = Toy()
    info = _info(model)
    trainable0 = apply_unfreezing(model, info, 0, 8)
    assert trainable0 == sum(p.numel() for p in model.head.parameters())
    apply_unfreezing(model, info, 2, 7)  # top int(2/7 * 7) = 2 layers of the 7-deep stack
    assert model.lang[2].weight.requires_grad and model.norm.weight.requires_grad
    assert model.lang[1].weight.requires_grad and not model.lang[0].weight.requires_grad
    assert not model.vis[0].weight.requires_grad
    full = apply_unfreezing(model, info, 7, 7)
    assert full == sum(p.numel() for p in model.parameters())
