"""Trajectory data: HDF5 reading/writing (robomimic / LIBERO layouts), datasets, normalization.

Keep this module light: no eager imports of torch-heavy submodules, so that `vla_ft.data.writer`
can be used by demo collection without paying for them. The names below load on first access.
"""

from importlib import import_module

_LAZY = {
    "build_datasets": "vla_ft.data.dataset",
    "build_trajectory_datasets": "vla_ft.data.dataset",
    "DatasetInfo": "vla_ft.data.dataset",
    "TrajectoryDataset": "vla_ft.data.trajectory",
    "ResumableSampler": "vla_ft.data.sampler",
    "Normalizer": "vla_ft.data.normalize",
    "ObsSpec": "vla_ft.data.transforms",
    "obs_to_inputs": "vla_ft.data.transforms",
    "Augmenter": "vla_ft.data.augment",
    "scan_file": "vla_ft.data.reader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vla_ft.data' has no attribute {name!r}")
