"""The auxiliary task terms of ``L_task``: one :class:`TaskTerm` record per term in :data:`TASK_TERMS`.

A term reads one policy output (``output``) against one batch key (``labels``) and says, once
before training (:func:`task_term_problems`), what it needs from the data and the policy:

* ``task_id``: cross-entropy of the task-id classifier (every dataset has the labels);
* ``progress``: MSE of the episode-progress regressor (every dataset has the labels);
* ``waypoint``: smooth L1 on the next gripper-toggle position relative to the hand, in training-std
  units; needs an end-effector position in the data (``data.waypoint_key``);
* ``grounding``: cross-entropy of the first two keypoint heat maps of each camera against where the
  instruction's named object and destination are in that image; needs ``targets/`` labels in the
  files (our collector writes them) and a backbone with at least 2 keypoints (why:
  docs/experiments/2026-11-pick-place-rounds.md, round 4).

:class:`vla_ft.losses.ActionTaskLoss` computes the configured terms through the registry; a term of
weight 0 whose labels the batch lacks is skipped (it would only be logged). A new term is one record
added to :data:`TASK_TERMS` (and its name to ``loss.task_terms``' check in vla_ft/config/schema.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from vla_ft import constants as K
from vla_ft.errors import ConfigError

GROUNDING_SIGMA_CELLS = 1.0  # std of the Gaussian target around the object, in heat-map cells
GROUNDING_MIN_HEATMAPS = 2  # heat map 0: the named object, 1: the destination


@runtime_checkable
class TermCapabilities(Protocol):
    """What a policy declares for the task terms' checks (``VLAPolicy`` and its subclasses do)."""

    @property
    def task_outputs(self) -> frozenset[str]:
        """The task outputs (``vla_ft.constants.OUT_*``) its forward returns."""
        ...

    @property
    def heatmap_count(self) -> int:
        """Keypoint heat maps per image of its vision encoder (0: none)."""
        ...


@dataclass(frozen=True)
class TaskTerm:
    """One auxiliary loss term.

    Attributes:
        name: the key in ``loss.task_terms``.
        labels: the batch key of its targets (``vla_ft.constants``).
        output: the policy output it reads (``vla_ft.constants.OUT_*``).
        loss: ``(prediction, labels, label_smoothing) -> scalar`` on the two tensors.
        no_labels: the error when a batch lacks ``labels`` while the term is computed.
        no_output: the error when the policy's outputs lack ``output`` while the term is computed.
        data_check: ``(cfg, dataset_info) -> message or None``: what the term needs from the data.
        policy_check: ``(policy) -> message or None``: what the term needs from the policy; without
            one, the policy must list ``output`` in its ``task_outputs``.
    """

    name: str
    labels: str
    output: str
    loss: Callable[[Tensor, Tensor, float], Tensor]
    no_labels: str
    no_output: str
    data_check: Callable[[Any, Any], str | None] | None = None
    policy_check: Callable[[TermCapabilities], str | None] | None = None

    def __call__(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], label_smoothing: float
    ) -> Tensor:
        """The term's scalar loss on one batch.

        Raises:
            ConfigError: the batch has no labels for it, or the outputs no prediction.
        """
        if self.labels not in batch:
            raise ConfigError(self.no_labels)
        if self.output not in outputs:
            raise ConfigError(self.no_output)
        return self.loss(outputs[self.output], batch[self.labels], label_smoothing)

    def requires(self, cfg: Any, info: Any = None, policy: TermCapabilities | None = None) -> list[str]:
        """What this term needs and the data (``info``, a ``DatasetInfo``) or the policy lacks, one
        message each (each side is checked when given). The policy's missing output, when the term
        has no ``policy_check``, is said by :func:`task_term_problems` for all such terms at once."""
        found = []
        if info is not None and self.data_check is not None:
            found.append(self.data_check(cfg, info))
        if policy is not None and self.policy_check is not None:
            found.append(self.policy_check(policy))
        return [msg for msg in found if msg]


def _task_id_loss(logits: Tensor, task_id: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy of the task-id classifier: (B, NT) logits vs (B,) ids."""
    return F.cross_entropy(logits.float(), task_id.long(), label_smoothing=label_smoothing)


def _progress_loss(pred: Tensor, progress: Tensor, label_smoothing: float) -> Tensor:
    """MSE of the episode-progress regressor: (B,) vs (B,) in [0, 1]."""
    del label_smoothing
    return F.mse_loss(pred.float(), progress.float())


def _waypoint_loss(pred: Tensor, waypoint: Tensor, label_smoothing: float) -> Tensor:
    """Smooth L1 of the next-waypoint regressor: (B, 3) vs (B, 3)."""
    del label_smoothing
    return F.smooth_l1_loss(pred.float(), waypoint.float())


def grounding_targets(uv: Tensor, h: int, w: int, sigma_cells: float = GROUNDING_SIGMA_CELLS) -> Tensor:
    """Soft targets (..., h*w) over the cell centres of an h x w heat map: a Gaussian at ``uv`` (..., 2).

    The cells are the keypoint layer's own (``vla_ft.models.vision.cell_centres``); sigma is
    ``sigma_cells`` cells. Rows of non-finite ``uv`` come out NaN (mask them).
    """
    from vla_ft.models.vision import cell_centres  # here: importing the task terms stays free of timm

    grid = cell_centres(h, w, uv.device)  # (h*w, 2)
    scale = torch.tensor([2.0 / w, 2.0 / h], device=uv.device) * sigma_cells  # one cell = 2/n
    d2 = (((grid - uv[..., None, :]) / scale) ** 2).sum(-1)  # (..., h*w)
    return torch.softmax(-0.5 * d2, dim=-1)


def _grounding_loss(heatmaps: Tensor, target_uv: Tensor, label_smoothing: float) -> Tensor:
    """Heat map 0 of each camera finds the named object, heat map 1 the destination.

    Cross-entropy of ``heatmaps[:, k, j]`` (B, K, Q, h, w) logits against a Gaussian at
    ``target_uv[:, k, j]`` (B, K, 2, 2), j = 0 (named object) and 1 (destination), averaged over the
    (sample, camera, object) triples whose target is known and inside the image. Privileged labels at
    training time only: the policy still sees images, state and the instruction, nothing else.
    """
    del label_smoothing
    heat = heatmaps[:, :, :GROUNDING_MIN_HEATMAPS].float()  # (B, K, 2, h, w)
    h, w = heat.shape[-2:]
    uv = target_uv.float()  # (B, K, 2, 2)
    known = torch.isfinite(uv).all(-1) & (uv.abs() <= 1.0).all(-1)  # (B, K, 2) in view
    target = grounding_targets(torch.nan_to_num(uv), h, w)  # (B, K, 2, h*w)
    ce = -(target * heat.flatten(-2).log_softmax(-1)).sum(-1)  # (B, K, 2)
    weight = known.float()
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def _waypoint_data(cfg: Any, info: Any) -> str | None:
    if info.waypoint_key is not None:
        return None
    return (
        f"loss.task_terms.waypoint needs an end-effector position in the data, but none of the "
        f"state keys {info.state_keys} is one (data.waypoint_key={cfg.data.waypoint_key!r}); set "
        f"data.waypoint_key, or drop 'waypoint' from loss.task_terms"
    )


def _grounding_data(cfg: Any, info: Any) -> str | None:
    del cfg
    if not info.files_without_targets:
        return None
    return (
        f"loss.task_terms.grounding needs the image positions of the instruction's objects "
        f"(data/demo_i/targets/<camera>, written by scripts/collect_demos.py), "
        f"but {', '.join(info.files_without_targets)} has none for cameras {info.image_keys}; "
        f"re-collect it (delete the file when data.collect_if_missing is on), or drop "
        f"'grounding' from loss.task_terms"
    )


def _grounding_policy(policy: TermCapabilities) -> str | None:
    heatmaps = policy.heatmap_count
    if heatmaps >= GROUNDING_MIN_HEATMAPS:
        return None
    return (
        f"loss.task_terms.grounding needs a backbone with at least 2 spatial-softmax keypoints "
        f"(heat map 0 = the named object, 1 = the destination); this model has {heatmaps}: use "
        f"the tiny preset or set model.extra.keypoints >= 2, or drop 'grounding' from "
        f"loss.task_terms"
    )


def _no_head(name: str, what: str) -> str:
    return (
        f"loss.task_terms has {name!r} but the model outputs no {what} (it has no task head): remove "
        f"{name!r} from loss.task_terms"
    )


TASK_TERMS: dict[str, TaskTerm] = {
    term.name: term
    for term in (
        TaskTerm(
            name="task_id",
            labels=K.TASK_ID,
            output=K.OUT_TASK_LOGITS,
            loss=_task_id_loss,
            no_labels="loss.task_terms has 'task_id' but the batches carry no task ids",
            no_output=_no_head("task_id", "task-id logits"),
        ),
        TaskTerm(
            name="progress",
            labels=K.PROGRESS,
            output=K.OUT_PROGRESS,
            loss=_progress_loss,
            no_labels="loss.task_terms has 'progress' but the batches carry no episode progress",
            no_output=_no_head("progress", "progress estimate"),
        ),
        TaskTerm(
            name="waypoint",
            labels=K.WAYPOINT,
            output=K.OUT_WAYPOINT,
            loss=_waypoint_loss,
            no_labels=(
                "loss.task_terms has 'waypoint' but the batches carry no waypoint target: the data has "
                "no end-effector position state key (data.waypoint_key); set data.waypoint_key to the "
                "key of the hand position, or remove 'waypoint' from loss.task_terms"
            ),
            no_output=_no_head("waypoint", "waypoint estimate"),
            data_check=_waypoint_data,
        ),
        TaskTerm(
            name="grounding",
            labels=K.TARGET_UV,
            output=K.OUT_HEATMAP,
            loss=_grounding_loss,
            no_labels=(
                "loss.task_terms has 'grounding' but the batches carry no targets: the demo files have "
                "no data/demo_i/targets/<camera> labels (scripts/collect_demos.py writes them for this "
                "suite's tasks); re-collect the files, or remove 'grounding' from "
                "loss.task_terms"
            ),
            no_output=(
                "loss.task_terms has 'grounding' but the model outputs no keypoint heat maps: use a "
                "native backbone with keypoints (model.extra.keypoints >= 2, as in the tiny preset), "
                "or remove 'grounding' from loss.task_terms"
            ),
            data_check=_grounding_data,
            policy_check=_grounding_policy,
        ),
    )
}


def task_term_problems(cfg: Any, info: Any = None, policy: TermCapabilities | None = None) -> list[str]:
    """What the configured task terms of weight > 0 need and the data or the policy lacks.

    Run once before training: with ``info`` (the ``DatasetInfo``) as soon as the data is scanned,
    with ``policy`` once it is built. The terms without a ``policy_check`` whose output the policy
    does not return are named together in one message.

    Args:
        cfg: the run config (``vla_ft.config.Config``).
        info: the dataset's ``DatasetInfo``, or None to skip the data checks.
        policy: the built policy, or None to skip the policy checks.

    Returns:
        One message per problem (empty: every term can train).
    """
    terms = [TASK_TERMS[name] for name, weight in cfg.loss.task_terms.items() if weight > 0]
    found = [msg for term in terms for msg in term.requires(cfg, info=info)]
    if policy is None:
        return found
    headless = [t.name for t in terms if t.policy_check is None and t.output not in policy.task_outputs]
    if headless:
        found.append(
            f"loss.task_terms {headless}: this model ({type(policy).__name__}) has no heads for them; "
            f"set loss.task_terms={{}} (its action loss trains alone)"
        )
    return found + [msg for term in terms for msg in term.requires(cfg, policy=policy)]
