"""VLA policies: building, loading, saving, parameter metadata."""

from vla_ft.models.heads import ACTION_HEADS, BinnedActionHead, ContinuousActionHead, TaskHead
from vla_ft.models.loading import build_policy, from_pretrained, load_vla, save_pretrained
from vla_ft.models.params import ParamInfo, count_parameters, param_info
from vla_ft.models.policy import ModelDims, VLAPolicy
from vla_ft.models.presets import PRESETS, Preset, get_preset, list_presets
from vla_ft.models.source import load_tokenizer

__all__ = [
    "ACTION_HEADS",
    "BinnedActionHead",
    "ContinuousActionHead",
    "ModelDims",
    "PRESETS",
    "ParamInfo",
    "Preset",
    "TaskHead",
    "VLAPolicy",
    "build_policy",
    "count_parameters",
    "from_pretrained",
    "get_preset",
    "list_presets",
    "load_tokenizer",
    "load_vla",
    "param_info",
    "save_pretrained",
]
