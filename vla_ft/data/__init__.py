"""Trajectory data: HDF5 reading/writing (robomimic / LIBERO layouts), datasets, normalization.

Keep this module light: no eager imports of torch-heavy submodules, so that `vla_ft.data.writer`
can be used by demo collection without paying for them.
"""
