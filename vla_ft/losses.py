"""The combined fine-tuning loss ``L = w_action * L_action + w_task * L_task``.

Pure functions for the action terms plus one :class:`ActionTaskLoss` module that combines them with
the task terms and returns per-term metrics (each term, each action dimension's error, the gripper
accuracy). Metrics are detached tensors: converting them to Python floats (a host sync) is the
logger's job, done only on logging steps.

Action terms work in normalized action units (the units the policy predicts in):
* continuous heads: L1 (default), MSE or Huber over the chunk, masked at padding, optionally
  weighted per action dimension;
* binned heads: cross-entropy (with label smoothing) over ``n_bins`` uniform bins on
  ``[bin_low, bin_high]``; targets outside the range fall into the edge bins;
* flow heads (SmolVLA): the squared error of the predicted velocity at a sampled flow time,
  averaged over valid (step, dim) entries (the per-dim errors are then of the one-step estimate).

Task terms come from the registry in :mod:`vla_ft.task_terms` (``task_id``, ``progress``,
``waypoint``, ``grounding``): each configured term is computed through its record, and a term of
weight 0 whose labels the batch lacks is skipped (it would only be logged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_ft import constants as K
from vla_ft.config import LossConfig
from vla_ft.data.layout import gripper_index
from vla_ft.errors import ConfigError
from vla_ft.task_terms import TASK_TERMS


def _masked_mean(per_elem: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean of ``per_elem`` (B, H, A) with ``weight`` broadcastable to it."""
    weight = weight.expand_as(per_elem)
    return (per_elem * weight).sum() / weight.sum().clamp_min(1e-8)


def regression_error(pred: Tensor, target: Tensor, kind: str, huber_delta: float = 1.0) -> Tensor:
    """Element-wise regression error (no reduction); ``kind`` in l1 | mse | huber."""
    if kind == "l1":
        return (pred - target).abs()
    if kind == "mse":
        return (pred - target).square()
    if kind == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    raise ConfigError(f"loss.action={kind!r} is unknown: use l1, mse or huber")


def discretize(action: Tensor, n_bins: int, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Uniform bin ids (int64, same shape) of normalized actions over ``[low, high]``.

    Bin ``i`` covers ``[low + i*w, low + (i+1)*w)`` with ``w = (high - low) / n_bins``; values outside
    the range go to the edge bins. :func:`bin_centers` inverts it up to the bin width.
    """
    width = (high - low) / n_bins
    ids = torch.floor((action - low) / width).long()
    return ids.clamp_(0, n_bins - 1)


def bin_centers(n_bins: int, low: float = -1.0, high: float = 1.0, device=None) -> Tensor:
    """(n_bins,) centers of the uniform bins used by :func:`discretize`."""
    width = (high - low) / n_bins
    return low + width * (torch.arange(n_bins, device=device, dtype=torch.float32) + 0.5)


class ActionTaskLoss(nn.Module):
    """``L = w_action * L_action + w_task * sum_k w_k * L_task_k``, each term logged.

    Args:
        cfg: the loss section of the config.
        action_dim: A, the action dimension (checks ``cfg.dim_weights``).
        head: ``continuous``, ``binned`` or ``flow`` (the policy's action head).
        n_bins, bin_low, bin_high: binning of normalized actions for the binned head.
        gripper_zero: the normalized value of a zero gripper command, so gripper accuracy compares
            open/close decisions in env units (None: 0.0).
    """

    def __init__(
        self,
        cfg: LossConfig,
        action_dim: int,
        head: str = "continuous",
        n_bins: int = 256,
        bin_low: float = -1.0,
        bin_high: float = 1.0,
        gripper_zero: float | None = None,
    ) -> None:
        super().__init__()
        if cfg.dim_weights is not None and len(cfg.dim_weights) != action_dim:
            raise ConfigError(
                f"loss.dim_weights has {len(cfg.dim_weights)} values but the action has {action_dim} "
                f"dimensions: give one weight per action dimension"
            )
        gripper = gripper_index(action_dim, cfg.gripper_dim)
        if gripper is None:
            raise ConfigError(
                f"loss.gripper_dim={cfg.gripper_dim} is out of range for a {action_dim}-dim action"
            )
        self.cfg = cfg
        self.action_dim = action_dim
        self.head = head
        self.n_bins, self.bin_low, self.bin_high = n_bins, bin_low, bin_high
        self.gripper_dim = gripper
        self.gripper_zero = 0.0 if gripper_zero is None else float(gripper_zero)
        weights = torch.ones(action_dim) if cfg.dim_weights is None else torch.tensor(cfg.dim_weights)
        self.register_buffer("dim_weights", weights.float(), persistent=False)

    def action_loss(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Returns (scalar action loss, (A,) per-dimension mean absolute error), masked at padding."""
        target = batch[K.ACTION].float()  # (B, H, A)
        valid = (~batch[K.ACTION_IS_PAD]).float().unsqueeze(-1)  # (B, H, 1)
        pred = outputs[K.OUT_ACTION].float()
        if self.head == "flow":  # flow matching: the velocity's squared error, LeRobot's reduction
            loss = _masked_mean(outputs[K.OUT_FLOW_ERR].float(), valid * self.dim_weights)
        elif self.head == "binned":
            logits = outputs[K.OUT_ACTION_LOGITS].float()  # (B, H, A, NB)
            ids = discretize(target, self.n_bins, self.bin_low, self.bin_high)  # (B, H, A)
            ce = F.cross_entropy(
                logits.flatten(0, 2),
                ids.flatten(),
                reduction="none",
                label_smoothing=self.cfg.label_smoothing,
            ).view_as(target)
            loss = _masked_mean(ce, valid * self.dim_weights)
        else:
            err = regression_error(pred, target, self.cfg.action, self.cfg.huber_delta)
            loss = _masked_mean(err, valid * self.dim_weights)
        abs_err = (pred.detach() - target).abs() * valid  # (B, H, A)
        per_dim = abs_err.sum(dim=(0, 1)) / valid.sum().clamp_min(1.0)  # (A,)
        return loss, per_dim

    def forward(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the combined loss.

        Returns:
            loss: scalar tensor to backpropagate.
            metrics: detached scalar tensors: ``loss``, ``loss/action``, ``loss/task``,
                ``loss/task_<term>``, ``action_err/dim<i>``, ``gripper_acc``.
        """
        metrics: dict[str, Tensor] = {}
        l_action, per_dim = self.action_loss(outputs, batch)
        l_task = l_action.new_zeros(())
        for name, weight in self.cfg.task_terms.items():
            term = TASK_TERMS[name]
            if weight == 0 and term.labels not in batch:
                continue  # a weight-0 term is only logged: skip it where the data has no labels for it
            value = term(outputs, batch, self.cfg.label_smoothing)
            metrics[f"loss/task_{name}"] = value.detach()
            l_task = l_task + weight * value
        loss = self.cfg.w_action * l_action + self.cfg.w_task * l_task
        metrics["loss"] = loss.detach()
        metrics["loss/action"] = l_action.detach()
        metrics["loss/task"] = l_task.detach()
        for i in range(self.action_dim):
            metrics[f"action_err/dim{i}"] = per_dim[i]
        metrics["gripper_acc"] = self.gripper_accuracy(outputs, batch)
        return loss, metrics

    def gripper_accuracy(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Share of non-padded steps whose open/close decision matches the target's."""
        g = self.gripper_dim
        pred = outputs[K.OUT_ACTION][..., g].detach().float() > self.gripper_zero
        target = batch[K.ACTION][..., g].float() > self.gripper_zero
        valid = ~batch[K.ACTION_IS_PAD]
        return ((pred == target) & valid).sum().float() / valid.sum().clamp_min(1).float()
