"""Parameter metadata for the optimizer: module and layer depth of every parameter."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vla_ft.constants import MODULE_HEADS, MODULE_PROJECTOR

# Policy-level parameters outside the backbone: input adapters count as projector, the rest as heads.
_POLICY_MODULES = {
    "view_embed": MODULE_PROJECTOR,
    "state_proj": MODULE_PROJECTOR,
    "state_film": MODULE_PROJECTOR,
}


@dataclass(frozen=True)
class ParamInfo:
    """Where a parameter sits.

    Attributes:
        module: one of vision, language, projector, heads.
        depth: 0 = closest to the input (embeddings / stem); num_layers - 1 = the top (final norm).
        num_layers: number of depths in that module.
    """

    module: str
    depth: int
    num_layers: int


def param_info(policy: nn.Module) -> dict[str, ParamInfo]:
    """ParamInfo for every parameter name of ``policy`` (as in ``named_parameters()``).

    Raises:
        RuntimeError: a parameter has no metadata (a bug in a backbone's ``depths``).
    """
    depths = {f"backbone.{n}": v for n, v in policy.backbone.depths().items()}
    out: dict[str, ParamInfo] = {}
    for name, _ in policy.named_parameters(remove_duplicate=False):
        if name in depths:
            out[name] = ParamInfo(*depths[name])
        elif not name.startswith("backbone."):
            out[name] = ParamInfo(_POLICY_MODULES.get(name.split(".")[0], MODULE_HEADS), 0, 1)
        else:
            raise RuntimeError(f"parameter {name} has no module/depth metadata")
    return out


def count_parameters(policy: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared tensors counted once)."""
    params = list(policy.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_freeze(policy: nn.Module, modules: list[str]) -> None:
    """Set ``requires_grad=False`` on every parameter of the named modules (full FT: none)."""
    info = param_info(policy)
    for name, p in policy.named_parameters():
        p.requires_grad_(info[name].module not in modules)
