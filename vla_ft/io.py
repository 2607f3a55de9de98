"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` all at once or not at all: into ``.<name>.tmp`` beside it, then ``os.replace``.

    Args:
        path: the file to write (its directory must exist).
        data: text, bytes, or a function that writes the temporary file it is given (e.g.
            ``lambda tmp: fig.savefig(tmp, format="png")``; give the format, the name ends in .tmp).

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data)
    elif isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        data(tmp)
    os.replace(tmp, path)
    return path
