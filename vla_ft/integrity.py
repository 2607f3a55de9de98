"""Checkpoint integrity: a ``manifest.json`` with the size and sha256 of every file, and its check.

Every directory vla-ft writes as a checkpoint (``save_pretrained``, the trainer's
``checkpoints/step_N``) ends with a manifest, written last: a directory whose manifest is present
was completely written. Loading verifies the files it is about to read against it (sizes first,
which catches a truncated copy at once, then the sha256) and names the first file that fails.
A directory without a manifest (an older vla-ft checkpoint, or one made by hand) loads unverified.

Hashing runs on a few threads (``hashlib`` releases the GIL on large updates), at roughly 1-2 GB/s
per core: a second or so for a 1B-parameter checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vla_ft.errors import CheckpointError
from vla_ft.io import write_atomic

MANIFEST = "manifest.json"
FORMAT = "vla_ft.manifest"
_CHUNK = 8 << 20
# (resolved path, size, mtime) of files already verified in this process: resuming reads the model
# weights twice (policy, then training state) and must not hash them twice
_verified: set[tuple[str, int, int]] = set()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(directory: Path) -> Path:
    """Hash every file under ``directory`` (recursively) into ``directory/manifest.json``."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = _hash_all(files)
    entries = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests)
    }
    return write_atomic(
        directory / MANIFEST, json.dumps({"format": FORMAT, "version": 1, "files": entries}, indent=1)
    )


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's file table, or None when the directory has no manifest."""
    file = Path(directory) / MANIFEST
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
        files = meta["files"]
        if meta.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a vla-ft manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{file}: unreadable checkpoint manifest ({exc}); the directory was damaged: re-copy it, "
            f"or choose another checkpoint"
        ) from None
    return files


def manifest_bytes(directory: Path) -> int | None:
    """Total size of the files a checkpoint's manifest lists (None: no manifest)."""
    files = read_manifest(directory)
    return None if files is None else sum(int(e["bytes"]) for e in files.values())


def verify(directory: Path, include: Callable[[str], bool] = lambda name: True) -> bool:
    """Check the files of ``directory`` that its manifest lists and ``include`` selects.

    Returns:
        True when they were verified, False when the directory has no manifest.

    Raises:
        CheckpointError: naming the first missing, truncated or changed file and the fix.
    """
    directory = Path(directory)
    files = read_manifest(directory)
    if files is None:
        return False
    fix = "re-copy the checkpoint directory, or choose another checkpoint (runs/<run>/checkpoints/step_N)"
    todo: list[tuple[Path, dict]] = []
    for name, entry in sorted(files.items()):
        if not include(name):
            continue
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST}); {fix}")
        size = path.stat().st_size
        if size != int(entry["bytes"]):
            raise CheckpointError(
                f"{path}: {size:,} bytes but {int(entry['bytes']):,} were saved (truncated or "
                f"changed copy); {fix}"
            )
        stamp = (str(path.resolve()), size, path.stat().st_mtime_ns)
        if stamp not in _verified:
            todo.append((path, entry))
    for (path, entry), digest in zip(todo, _hash_all([p for p, _ in todo])):
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 {digest[:12]}... differs from the saved {entry['sha256'][:12]}... "
                f"(the file is damaged or was changed after saving); {fix}"
            )
        _verified.add((str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns))
    return True


def model_files(name: str) -> bool:
    """Manifest entries a model load reads (everything but the trainer's ``training_state/``)."""
    return not name.startswith("training_state/")
