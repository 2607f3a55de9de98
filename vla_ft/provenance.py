"""Where a result came from: the repository's commit, the versions of the packages that decide
results, and the machine. Recorded in evaluation reports, model cards and benchmark reports."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from vla_ft.config import REPO_ROOT

PACKAGES = ("numpy", "torch", "mujoco", "gymnasium", "vla-ft", "transformers", "timm", "metaworld", "ray")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Python and the versions of the packages that decide results (PACKAGES)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    versions.update({pkg: _version(pkg) for pkg in PACKAGES})
    return versions


def git_commit() -> str | None:
    """HEAD of the repository holding this package, with ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: platform, processor, CPU count, Python and torch versions."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
