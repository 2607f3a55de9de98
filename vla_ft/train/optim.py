"""AdamW parameter groups and learning-rate schedules.

Groups follow the project's full fine-tuning recipe (docs/training.md):

* no weight decay for biases, normalization weights, embeddings and learned tokens;
* discriminative learning rates: ``train.module_lr`` multiplies the peak LR per module
  (vision, language, projector, heads);
* layer-wise LR decay across both backbones, treated as one stack from the output down:
  heads and the top language layer get ``decay^0``, lower language layers ``decay^1, decay^2, ...``,
  then the projector, then the vision layers from the top stage down. A layer ``d`` steps from the
  top gets ``lr * decay^d`` (the usual formula ``base_lr * decay^(N - i - 1)`` for layer i of N).

Schedules come from transformers: warmup then cosine (with an optional floor), warmup then linear
decay to zero (the usual formula), or warmup then constant. ``LambdaLR`` multiplies each group's own
initial LR, so per-group ratios hold at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adam import adam as adam_fn
from transformers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from vla_ft import constants as K
from vla_ft.config import TrainConfig
from vla_ft.errors import ConfigError

_NO_DECAY_NAME_PARTS = ("bias", "norm", "embed", "pos_emb", "query", "cls_token", "_token")


@dataclass(frozen=True)
class GroupKey:
    module: str
    depth_from_top: int
    decay: bool


def depth_from_top(info: dict, name: str) -> int:
    """Depth of parameter ``name`` from the top of the joint stack (0 = next to the output)."""
    pi = info[name]
    lang_layers = max((p.num_layers for p in info.values() if p.module == K.MODULE_LANGUAGE), default=0)
    own = max(pi.num_layers - 1 - pi.depth, 0)
    if pi.module == K.MODULE_HEADS:
        return 0
    if pi.module == K.MODULE_LANGUAGE:
        return own
    if pi.module == K.MODULE_PROJECTOR:
        return lang_layers
    return lang_layers + 1 + own  # vision


def uses_weight_decay(name: str, param: nn.Parameter, embedding_params: set[str]) -> bool:
    """Weight decay only for matrices/kernels that are not embeddings, norms or learned tokens."""
    if param.ndim < 2 or name in embedding_params:
        return False
    leaf = name.lower()
    return not any(part in leaf for part in _NO_DECAY_NAME_PARTS)


def _embedding_param_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def build_param_groups(model: nn.Module, info: dict, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: one per (module, depth from top, decay) with its own ``lr``.

    Args:
        model: the policy.
        info: ``param_info(model)``: name -> ParamInfo(module, depth, num_layers) for every parameter.
        cfg: the train section (peak lr, weight decay, module multipliers, layer decay).

    Every parameter lands in exactly one group, trainable or not (progressive unfreezing toggles
    ``requires_grad`` later; AdamW skips parameters without gradients).
    """
    embedding = _embedding_param_names(model)
    groups: dict[GroupKey, list] = {}
    names: dict[GroupKey, list[str]] = {}
    for name, param in model.named_parameters():
        if name not in info:
            raise KeyError(f"param_info has no entry for parameter '{name}'")
        key = GroupKey(
            info[name].module, depth_from_top(info, name), uses_weight_decay(name, param, embedding)
        )
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    out = []
    for key in sorted(groups, key=lambda k: (k.module, k.depth_from_top, k.decay)):
        lr = cfg.lr * cfg.module_lr.get(key.module, 1.0) * cfg.layer_decay**key.depth_from_top
        out.append(
            {
                "params": groups[key],
                "param_names": names[key],
                "lr": lr,
                "weight_decay": cfg.weight_decay if key.decay else 0.0,
                "module": key.module,
                "depth_from_top": key.depth_from_top,
            }
        )
    return out


def build_optimizer(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the groups (group metadata keys stay in ``param_groups``).

    ``train.optimizer=adamw``: torch's fused AdamW (CPU and CUDA; it takes the NaN-skip flag on the
    device). ``adamw8bit``: torchao's AdamW8bit (exp_avg/exp_avg_sq in 8 bits with a scale per 256
    values; tensors under 4,096 values stay fp32). ``train.optimizer_in_backward``: fused AdamW
    stepped per parameter inside backward (:class:`InBackwardAdamW`).
    """
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.optimizer == "adamw8bit":
        return _adamw8bit(groups, kwargs, device)
    if cfg.optimizer_in_backward:
        return InBackwardAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def _adamw8bit(groups: list[dict], kwargs: dict, device: torch.device) -> torch.optim.Optimizer:
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError(
            "train.optimizer=adamw8bit needs torchao: pip install -e '.[lowmem]' (or pip install torchao), "
            "or use train.optimizer=adamw"
        ) from None
    if device.type == "cuda":  # torchao compiles its per-parameter update (once per tensor shape)
        return AdamW8bit(groups, **kwargs)

    class EagerAdamW8bit(AdamW8bit):
        """On the CPU, compiling the update costs minutes per run (a compile per tensor shape on a
        few cores); the same arithmetic runs eagerly (torchao's quantized state is a tensor subclass)."""

        def step(self, closure=None):
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return EagerAdamW8bit(groups, **kwargs)


class InBackwardAdamW(torch.optim.AdamW):
    """Fused AdamW whose update of each parameter runs in backward, right after that parameter's
    gradient is complete (a post-accumulate-grad hook), and which then frees the gradient: the
    gradients of the whole model never exist at once (saves 4 bytes/parameter at fp32).

    ``step()`` does nothing (the work is done); state, ``state_dict`` and LR schedulers are those of
    ``torch.optim.AdamW``. Before each backward the train step calls :meth:`begin` with the loss:
    a non-finite loss skips every update of that backward (on the device); a non-finite gradient
    skips that parameter's update only. :meth:`finish` returns the global gradient norm.
    Needs one micro-batch per step and no clipping (the global norm is known only at the end).
    """

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, fused=True, **kwargs)
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._loss_bad: torch.Tensor | None = None
        self._sq_sum: torch.Tensor | None = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._step_param) for p in self._group_of if p.requires_grad
        ]

    def begin(self, loss: torch.Tensor) -> None:
        """Arm the hooks for one backward of ``loss``."""
        self._loss_bad = (~torch.isfinite(loss.detach())).float()
        self._sq_sum = torch.zeros((), device=loss.device)

    @torch.no_grad()
    def _step_param(self, p: torch.Tensor) -> None:
        if self._loss_bad is None:
            raise RuntimeError("InBackwardAdamW: call begin(loss) before backward")
        group, grad = self._group_of[p], p.grad
        sq = grad.float().square().sum()
        self._sq_sum += sq.to(self._sq_sum.device)
        found_inf = torch.clamp(self._loss_bad.to(grad.device) + (~torch.isfinite(sq)).float(), max=1.0)
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adam_fn(
            [p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
            fused=True, grad_scale=None, found_inf=found_inf, decoupled_weight_decay=True,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
            eps=group["eps"], maximize=False,
        )  # fmt: skip
        p.grad = None

    def finish(self) -> torch.Tensor:
        """The global L2 norm of this backward's gradients (before any update); disarms the hooks."""
        norm = self._sq_sum.sqrt()
        self._loss_bad = self._sq_sum = None
        return norm

    def step(self, closure=None):  # noqa: D102 - the updates ran in backward
        return None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then ``cfg.schedule`` (cosine | linear | constant) over ``cfg.steps`` optimizer steps."""
    if cfg.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, cfg.warmup_steps, cfg.steps, min_lr_rate=cfg.min_lr_ratio
        )
    if cfg.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)


def lr_metrics(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, peak_lr: float
) -> dict[str, float]:
    """The learning rates to log: ``lr``, the base rate (``train.lr`` after the schedule), and
    ``lr/<module>`` for each module of the parameter groups (under layer decay, its top layer's
    rate: the groups are ordered by module, then depth from the top)."""
    rates = {"lr": float(peak_lr * scheduler.lr_lambdas[0](scheduler.last_epoch))}
    for group in optimizer.param_groups:
        rates.setdefault(f"lr/{group['module']}", float(group["lr"]))
    return rates


def apply_unfreezing(model: nn.Module, info: dict, step: int, unfreeze_steps: int) -> int:
    """Progressive unfreezing: at ``step`` of ``unfreeze_steps`` the top ``int(step/unfreeze_steps*N)``
    layers of the joint stack are trainable; the heads always are. Returns the trainable count."""
    if unfreeze_steps <= 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    depths = {name: depth_from_top(info, name) for name in info}
    total = max(depths.values()) + 1
    open_layers = int(min(step / unfreeze_steps, 1.0) * total)
    count = 0
    for name, param in model.named_parameters():
        trainable = (
            info[name].module == K.MODULE_HEADS or depths[name] < open_layers or step >= unfreeze_steps
        )
        param.requires_grad_(trainable)
        count += param.numel() if trainable else 0
    return count
