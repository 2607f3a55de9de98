"""Memory savers and the device-side NaN skip: optimizer step in backward, 8-bit AdamW state."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from vla_ft import constants as K
from vla_ft.config import TrainConfig
from vla_ft.data.dataset import build_datasets
from vla_ft.errors import ConfigError
from vla_ft.losses import ActionTaskLoss
from vla_ft.models import load_tokenizer, load_vla, param_info
from vla_ft.train.finetune import run_finetune
from vla_ft.train.logging import read_metrics
from vla_ft.train.optim import InBackwardAdamW, build_optimizer, build_param_groups
from vla_ft.train.step import autocast, train_step

CPU = torch.device("cpu")
AMP = lambda: autocast(CPU, "fp32")  # noqa: E731


def _setup(cfg):
    torch.manual_seed(cfg.seed)
    train_ds, _, info = build_datasets(cfg.data, load_tokenizer(cfg.model), cfg.seed)
    policy = load_vla(cfg.model, info)
    batch = torch.utils.data.default_collate([train_ds[i] for i in range(8)])
    return policy, batch, ActionTaskLoss(cfg.loss, info.action_dim)


def _optimizer(policy, tc: TrainConfig):
    return build_optimizer(build_param_groups(policy, param_info(policy), tc), tc, CPU)


def test_optimizer_in_backward_equals_fused_adamw_and_frees_gradients(tiny_cfg):
    cfg = tiny_cfg(**{"train.grad_clip": 0.0, "train.warmup_steps": 0, "train.weight_decay": 0.1})
    policy, batch, loss_fn = _setup(cfg)
    twin = copy.deepcopy(policy)
    tc_in = TrainConfig(**{**cfg.train.__dict__, "optimizer_in_backward": True})
    plain, fused_in = _optimizer(policy, cfg.train), _optimizer(twin, tc_in)
    assert isinstance(fused_in, InBackwardAdamW)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        m_plain, ok_plain = train_step(policy, loss_fn, [batch], plain, scaler, AMP, 0.0)
        m_in, ok_in = train_step(twin, loss_fn, [batch], fused_in, scaler, AMP, 0.0)
        assert bool(ok_plain) and bool(ok_in)
        torch.testing.assert_close(m_in["grad_norm"], m_plain["grad_norm"], rtol=1e-5, atol=0)
        assert all(p.grad is None for p in twin.parameters())  # freed inside backward
    for (name, a), b in zip(policy.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    # the same state layout as AdamW: checkpoints and LR schedulers need nothing special
    assert fused_in.state_dict()["state"].keys() == plain.state_dict()["state"].keys()


def test_optimizer_in_backward_skips_a_nan_loss_on_the_device(tiny_cfg):
    cfg = tiny_cfg(**{"train.grad_clip": 0.0, "train.optimizer_in_backward": "true"})
    policy, batch, loss_fn = _setup(cfg)
    opt = _optimizer(policy, cfg.train)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(policy, loss_fn, [batch], opt, scaler, AMP, 0.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    poisoned = lambda out, b: loss_fn({**out, K.OUT_ACTION: out[K.OUT_ACTION] * float("nan")}, b)  # noqa: E731
    metrics, ok = train_step(policy, loss_fn=poisoned, micro_batches=[batch], optimizer=opt, scaler=scaler,
                             amp=AMP, grad_clip=0.0)  # fmt: skip
    assert not bool(ok) and not torch.isfinite(metrics["loss"])
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())  # the skipped step is not counted


def test_fused_adamw_skip_leaves_weights_and_step_count(tiny_cfg):
    """The NaN skip without a host sync: fused AdamW takes the flag (found_inf) on the device."""
    cfg = tiny_cfg()
    policy, batch, loss_fn = _setup(cfg)
    opt = _optimizer(policy, cfg.train)
    assert opt.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(policy, loss_fn, [batch], opt, scaler, AMP, 1.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    poisoned = lambda out, b: loss_fn({**out, K.OUT_ACTION: out[K.OUT_ACTION] * float("nan")}, b)  # noqa: E731
    _, ok = train_step(policy, poisoned, [batch], opt, scaler, AMP, 1.0)
    assert isinstance(ok, torch.Tensor) and ok.dtype == torch.bool and not bool(ok)
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]), name
    assert {float(s["step"]) for s in opt.state.values()} == {1.0}


def test_skipped_steps_rewind_the_schedule_at_the_next_log_step(tiny_cfg, monkeypatch):
    """Skips are read on log steps only: the LR schedule then stands where it would have had it
    not advanced on the skipped steps (a skipped step still counts as a step)."""
    import vla_ft.train.loop as loop

    extra = {"train.steps": 8, "log.every": 4, "train.val_every": 0, "train.save_every": 8,
             "train.max_bad_steps": 5, "train.schedule": "linear", "train.warmup_steps": 0}  # fmt: skip
    calls, real = {"n": 0}, loop.train_step

    def flaky(model, loss_fn, *args, **kwargs):  # steps 3, 4 and 5 see a NaN loss
        calls["n"] += 1
        if calls["n"] in (3, 4, 5):
            good = loss_fn
            loss_fn = lambda out, b: good({**out, K.OUT_ACTION: out[K.OUT_ACTION] * float("nan")}, b)  # noqa: E731
        return real(model, loss_fn, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", flaky)
    result = run_finetune(tiny_cfg(**extra))
    rows = [r for r in read_metrics(result.run_dir) if r["split"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(4, 2), (8, 3)]
    sched = torch.load(result.run_dir / "last" / "training_state" / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 8 - 3
    # linear, 5 of 8 steps: the last group (vision) and the base rate
    assert rows[-1]["lr/vision"] == pytest.approx(sched["base_lrs"][-1] * (1 - 5 / 8))
    assert rows[-1]["lr"] == pytest.approx(tiny_cfg(**extra).train.lr * (1 - 5 / 8))


def test_adamw8bit_trains_and_resumes_exactly(tiny_cfg):
    pytest.importorskip("torchao")
    common = {"train.steps": 4, "train.save_every": 2, "train.val_every": 0, "train.optimizer": "adamw8bit"}
    full = run_finetune(tiny_cfg(**common, **{"train.run_name": "a", "train.deterministic": "true"}))
    ckpt = full.run_dir / "checkpoints" / "step_0000002"
    resumed = run_finetune(
        tiny_cfg(
            **common, **{"train.run_name": "b", "train.deterministic": "true", "train.resume": str(ckpt)}
        )
    )
    a = {r["step"]: r["loss"] for r in read_metrics(full.run_dir)}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed.run_dir)}
    assert sorted(b) == [3, 4] and all(b[s] == pytest.approx(a[s], rel=1e-6) for s in (3, 4))
    state = torch.load(ckpt / "training_state" / "optimizer.pt", weights_only=False)["state"]
    big = [s for s in state.values() if s["exp_avg"].numel() >= 4096]
    assert big and all(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in big)
    codes = sum(s["exp_avg"].codes.numel() * s["exp_avg"].codes.element_size() for s in big)
    fp32 = sum(s["exp_avg"].numel() * 4 for s in big)
    assert codes == fp32 // 4  # one byte per value instead of four (plus a scale per 256)


def test_adamw8bit_without_torchao_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)
    with pytest.raises(
        ConfigError, match=r"train.optimizer=adamw8bit needs torchao: pip install -e '.\[lowmem\]'"
    ):
        build_optimizer(
            [{"params": [torch.nn.Parameter(torch.zeros(2))]}], TrainConfig(optimizer="adamw8bit"), CPU
        )


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"optimizer_in_backward": True}, "grad_clip=1.0: set train.grad_clip=0"),
        ({"optimizer_in_backward": True, "grad_clip": 0.0, "grad_accum": 2}, "train.grad_accum=2"),
        ({"cpu_offload": True}, "train.cpu_offload=True is invalid: CPU offload is FSDP2's"),
        ({"parallel": "fsdp", "ema": 0.99}, "EMA is not supported with train.parallel=fsdp"),
        ({"parallel": "ddp", "unfreeze_steps": 10}, "progressive unfreezing is not supported"),
    ],
)
def test_unsupported_combinations_name_the_key_and_the_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig(**override)
