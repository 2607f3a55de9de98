"""Reading LeRobotDataset v3 roots (parquet + PNG or mp4) into the same scan as an HDF5 file.

A v3 root holds ``meta/info.json`` (features, fps, path templates), ``meta/tasks.parquet`` (task
strings), ``meta/episodes/chunk-*/file-*.parquet`` (per episode: length, global row range, task
list, per camera video file and start time) and ``data/chunk-*/file-*.parquet`` (one row per frame:
low-dim features, and for image-mode cameras a ``{bytes, path}`` struct holding a PNG). Video-mode
cameras live in ``videos/<camera>/chunk-*/file-*.mp4``, several episodes back to back; frame i of
an episode is at ``from_timestamp + i / fps`` in its file.

:func:`scan_lerobot` checks the metadata against the data and returns a
:class:`~vla_ft.data.reader.FileScan` whose demos are the episodes (``episode_<index>``), so
splits, history, chunks, normalization and mixing work exactly as for HDF5 files. Images are not
decoded there: :class:`LeRobotFrames` (the scan's ``frames``) decodes a whole episode of one camera
at a time, video with PyAV reading forward from the episode's start (episodes in file order continue
the same decoder without a seek), PNG with Pillow.

Every problem an input can have is one :class:`~vla_ft.errors.DataError` naming the root, the
file or key, and the fix.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vla_ft.config import DataConfig
from vla_ft.data.scan import Demo, FileScan
from vla_ft.errors import DataError

LAYOUT = "lerobot_v3"
CAMERA_DTYPES = ("video", "image")
DEFAULT_ACTION = "action"
DEFAULT_STATE = "observation.state"
CAMERA_PREFIX = "observation.images."
# validation split names LeRobot users put in info.json "splits" next to "train"
VALID_SPLITS = ("valid", "validation", "val")
LAZY_EPISODE_BYTES = 512 * 2**20  # per process: decoded episodes kept for lazy reads
HDF5_SUFFIXES = (".hdf5", ".h5", ".he5", ".hdf")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---- paths ------------------------------------------------------------------------------------


def is_lerobot_path(path: str | Path) -> bool:
    """A directory (a dataset root) or, when nothing exists there, a hub id ``owner/name``."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.exists() or p.suffix.lower() in HDF5_SUFFIXES:
        return False
    return bool(_HUB_ID.fullmatch(str(path)))


def lerobot_cache_dir() -> Path:
    """Where LeRobot keeps downloaded datasets: ``$HF_LEROBOT_HOME`` or ``$HF_HOME/lerobot``."""
    if os.environ.get("HF_LEROBOT_HOME"):
        return Path(os.environ["HF_LEROBOT_HOME"]).expanduser()
    hf_home = os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))
    return Path(hf_home).expanduser() / "lerobot"


def resolve_root(path: str | Path) -> Path:
    """The local dataset root of ``path``: the directory itself, or a hub id's local copy.

    A hub id found in the LeRobot cache is used as is; otherwise, when online, it is downloaded
    into that cache with ``huggingface_hub``.
    """
    p = Path(path)
    if p.is_dir():
        return p
    cached = lerobot_cache_dir() / str(path)
    if (cached / "meta" / "info.json").is_file():
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise DataError(
            f"{path}: not a local directory, and not in the LeRobot cache ({cached}); offline "
            "(HF_HUB_OFFLINE=1), so nothing is downloaded: give the local dataset root in data.paths, "
            "or download it once online"
        )
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=str(path), repo_type="dataset", local_dir=str(cached))
    except Exception as exc:  # any hub failure (network, auth, unknown repo) becomes one message
        raise DataError(
            f"{path}: not a local directory, and downloading the hub dataset failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the id "
            "or give the local dataset root in data.paths"
        ) from None
    return cached


# ---- metadata ---------------------------------------------------------------------------------


def _read_json(f: Path, fix: str) -> Any:
    """A metadata JSON file; one DataError naming the file and ``fix`` when it does not parse."""
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{f}: cannot parse: {exc}; {fix}") from None


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json``, checked: a dict with a v3 ``codebase_version``, features, fps, data_path."""
    f = root / "meta" / "info.json"
    if not f.is_file():
        raise DataError(
            f"{root}: meta/info.json not found: not a LeRobotDataset root; data.paths takes HDF5 files "
            "and LeRobotDataset v3 directories (the folder holding meta/, data/ and videos/)"
        )
    info = _read_json(f, "the file is damaged: re-download or re-create the dataset")
    if not isinstance(info, dict):
        raise DataError(f"{f}: expected a JSON object, got {type(info).__name__}; re-download the dataset")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        if version.startswith("v2"):
            raise DataError(
                f"{f}: codebase_version {version}: a LeRobotDataset v2 (one parquet file per episode, "
                "meta/episodes.jsonl); this reader takes v3.x only: convert it with lerobot's v2.1 -> "
                "v3.0 converter (python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
                "--repo-id=<id>) in an environment that has lerobot, or download the dataset's v3.0 "
                "revision"
            )
        raise DataError(
            f"{f}: codebase_version {version or '(missing)'} is not v3.x; this reader takes "
            "LeRobotDataset v3 only: re-create or convert the dataset with lerobot >= 0.4"
        )
    for key, kind in (("features", dict), ("fps", (int, float)), ("data_path", str)):
        if not isinstance(info.get(key), kind):
            raise DataError(f"{f}: '{key}' missing or malformed; re-download or re-create the dataset")
    return info


def _read_parquet(path: Path, root: Path, columns: Sequence[str] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(
            f"{root}: {path.relative_to(root)}: file not found; the dataset is incomplete: "
            "re-download or re-create it"
        )
    try:
        return pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{root}: {path.relative_to(root)}: cannot read the parquet file ({exc}); "
            "re-download or re-create the dataset"
        ) from None


def _episodes(root: Path) -> dict[str, list]:
    """All ``meta/episodes`` rows, ordered by episode index (columns -> python lists)."""
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DataError(
            f"{root}: meta/episodes/chunk-*/file-*.parquet not found; the dataset is incomplete: "
            "re-download or re-create it"
        )
    tables = [_read_parquet(p, root) for p in files]
    cols: dict[str, list] = {}
    for t in tables:
        for name in t.column_names:
            if not name.startswith("stats/"):
                cols.setdefault(name, []).extend(t.column(name).to_pylist())
    need = ("episode_index", "length", "dataset_from_index", "dataset_to_index")
    for name in need:
        if name not in cols:
            raise DataError(
                f"{root}: meta/episodes: column '{name}' missing; re-create the dataset with lerobot >= 0.4"
            )
    order = np.argsort(np.asarray(cols["episode_index"]), kind="stable")
    return {k: [v[i] for i in order] for k, v in cols.items()}


def _tasks(root: Path) -> dict[int, str]:
    f = root / "meta" / "tasks.parquet"
    if not f.is_file():
        return {}
    t = _read_parquet(f, root)
    if "task_index" not in t.column_names or "task" not in t.column_names:
        raise DataError(
            f"{root}: meta/tasks.parquet: expected columns task_index and task, got {t.column_names}; "
            "re-create the dataset"
        )
    return dict(zip(t.column("task_index").to_pylist(), t.column("task").to_pylist()))


def _feature_hw(root: Path, key: str, feat: Mapping[str, Any]) -> tuple[int, int]:
    shape, names = list(feat.get("shape") or []), list(feat.get("names") or [])
    if len(shape) != 3:
        raise DataError(
            f"{root}: meta/info.json: feature {key}: expected an image shape (H, W, C), got {shape}"
        )
    if "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    return (int(shape[1]), int(shape[2])) if shape[0] == 3 else (int(shape[0]), int(shape[1]))


def default_image_key(feature: str) -> str:
    """``observation.images.front`` -> ``front_image`` (the robomimic ``<camera>_image`` naming)."""
    name = feature.removeprefix(CAMERA_PREFIX).removeprefix("observation.")
    return re.sub(r"[^\w]+", "_", name) + "_image"


def default_state_key(feature: str) -> str:
    """``observation.state`` -> ``state``; ``observation.environment_state`` -> ``environment_state``."""
    return re.sub(r"[^\w]+", "_", feature.removeprefix("observation."))


def _pick(root: Path, wanted: Sequence[str], names: Mapping[str, str], what: str, cfg_key: str) -> list[str]:
    """Feature names of ``wanted`` (each a feature name or its mapped name)."""
    by_ours = {v: k for k, v in names.items()}
    out = []
    for key in wanted:
        if key in names:
            out.append(key)
        elif key in by_ours:
            out.append(by_ours[key])
        else:
            have = ", ".join(f"{k} (= {v})" for k, v in names.items()) or "none"
            raise DataError(f"{root}: {cfg_key} names {key!r}, not a {what} of this dataset (has: {have})")
    return out


# ---- frames -----------------------------------------------------------------------------------


@dataclass
class _Camera:
    feature: str  # LeRobot feature name
    mode: str  # "video" | "image"
    hw: tuple[int, int]


class _VideoCursor:
    """One open video file, decoded forward; the next episode of the file continues without a seek."""

    def __init__(self, path: Path):
        import av

        self.container = av.open(str(path))
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self._frames: Iterator | None = None
        self._pending = None  # a decoded frame past the last episode's end, kept for the next one
        self.position = -np.inf  # time of the last frame consumed

    def read(self, start: float, length: int, fps: float, tol: float, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (length, H, W, 3) with the frames at ``start + i / fps``; returns the seen mask."""
        if self._frames is None or not (self.position + tol < start <= self.position + 2.0):
            self.container.seek(int(max(start, 0.0) / self.stream.time_base), stream=self.stream)
            self._frames, self._pending, self.position = self.container.decode(self.stream), None, -np.inf
        seen = np.zeros(length, bool)
        while not seen.all():
            frame, self._pending = (self._pending or next(self._frames, None)), None
            if frame is None:
                break
            t = frame.time
            if t is None or t < start - tol:
                continue
            i = int(round((t - start) * fps))
            if i >= length:
                self._pending = frame
                break
            if abs(t - (start + i / fps)) < tol and not seen[i]:
                if (frame.height, frame.width) != out.shape[1:3]:
                    raise ValueError(f"frame size {(frame.height, frame.width)}, expected {out.shape[1:3]}")
                out[i] = frame.to_ndarray(format="rgb24")
                seen[i] = True
            self.position = t
        return seen

    def close(self) -> None:
        self.container.close()


class LeRobotFrames:
    """Decodes the images of one v3 root, a whole episode of one camera at a time.

    ``episode(demo, key)`` returns uint8 (T, H, W, 3); decoded episodes stay in a per-process LRU
    of ``LAZY_EPISODE_BYTES`` so lazy reads of neighbouring samples decode nothing. Open files are
    per process (reopened after a fork, dropped when pickled).
    """

    def __init__(
        self,
        root: Path,
        fps: float,
        cameras: Mapping[str, _Camera],
        episodes: Mapping[str, dict[str, Any]],
        lru_bytes: int = LAZY_EPISODE_BYTES,
    ):
        self.root, self.fps = root, float(fps)
        self.cameras = dict(cameras)  # our image key -> camera
        self.episodes = dict(
            episodes
        )  # demo name -> {"rows": (data file, lo, hi), "videos": {key: (mp4, t0, length)}}
        self.lru_bytes = lru_bytes
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cursors: dict[Path, _VideoCursor] = {}
        self._columns: dict[str, tuple[Path, list]] = {}  # camera -> (data file, its image cells)
        self._lru: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_cursors={}, _columns={}, _lru=OrderedDict())
        return state

    def close(self) -> None:
        """Close this process's decoders and drop decoded episodes."""
        if self._pid == os.getpid():
            for c in self._cursors.values():
                c.close()
        self._reset()

    def forget(self) -> None:
        """Drop decoded episodes (decoders stay open and keep their position)."""
        self._lru.clear()

    def episode(self, demo: str, key: str) -> np.ndarray:
        if self._pid != os.getpid():  # forked: never touch the parent's decoders
            self._reset()
        hit = self._lru.get((demo, key))
        if hit is not None:
            self._lru.move_to_end((demo, key))
            return hit
        cam = self.cameras[key]
        ep = self.episodes[demo]
        frames = (
            self._video(demo, cam, *ep["videos"][key])
            if cam.mode == "video"
            else self._images(demo, cam, *ep["rows"])
        )
        if frames.shape[1:3] != cam.hw:
            raise DataError(
                f"{self.root}: {demo}: {cam.feature}: frames are {frames.shape[1:3]} but meta/info.json "
                f"says {cam.hw}; re-create the dataset"
            )
        self._lru[(demo, key)] = frames
        while len(self._lru) > 1 and sum(a.nbytes for a in self._lru.values()) > self.lru_bytes:
            self._lru.popitem(last=False)
        return frames

    def read(self, demo: str, key: str, frames: np.ndarray) -> np.ndarray:
        """Frames ``frames`` (any order, repeats allowed) of one episode and camera: (n, H, W, 3)."""
        return self.episode(demo, key)[frames]

    def _video(self, demo: str, cam: _Camera, path: Path, t0: float, length: int) -> np.ndarray:
        import av

        out = np.empty((length, *cam.hw, 3), np.uint8)
        tol = 0.5 / self.fps
        where = f"{self.root}: {path.relative_to(self.root)}"
        if not path.is_file():
            raise DataError(
                f"{where}: video file not found (camera {cam.feature}, {demo}); re-download the dataset"
            )
        try:
            cursor = self._cursors.get(path)
            if cursor is None:
                cursor = self._cursors[path] = _VideoCursor(path)
            seen = cursor.read(t0, length, self.fps, tol, out)
        except (av.FFmpegError, ValueError, OSError) as exc:
            self._cursors.pop(path, None)
            raise DataError(
                f"{where}: cannot decode (camera {cam.feature}, {demo}): {exc}; the video file is damaged "
                "or truncated: re-download the dataset"
            ) from None
        if not seen.all():
            raise DataError(
                f"{where}: {demo} needs {length} frames of camera {cam.feature} from t={t0:.3f} s, the "
                f"file has {int(seen.sum())} of them; the video does not match meta/episodes: re-download "
                "or re-create the dataset"
            )
        return out

    def _images(self, demo: str, cam: _Camera, path: Path, lo: int, hi: int) -> np.ndarray:
        from PIL import Image

        held = self._columns.get(cam.feature)
        if held is None or held[0] != path:  # one data file's PNG bytes per camera stay in RAM
            table = _read_parquet(path, self.root, [cam.feature])
            held = self._columns[cam.feature] = (path, table.column(cam.feature).to_pylist())
        cells = held[1][lo:hi]
        out = np.empty((hi - lo, *cam.hw, 3), np.uint8)
        for i, cell in enumerate(cells):
            data = cell.get("bytes") if isinstance(cell, dict) else None
            try:
                if data is None:
                    rel = cell.get("path") if isinstance(cell, dict) else None
                    data = (self.root / rel).read_bytes() if rel else None
                if data is None:
                    raise ValueError("no image bytes and no path")
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"{self.root}: {path.relative_to(self.root)}: {demo} frame {i} of {cam.feature}: "
                    f"cannot decode the image ({exc}); re-download or re-create the dataset"
                ) from None
            if img.shape[:2] != cam.hw:
                raise DataError(
                    f"{self.root}: {demo} frame {i} of {cam.feature}: image is {img.shape[:2]} but "
                    f"meta/info.json says {cam.hw}; re-create the dataset"
                )
            out[i] = img
        return out


# ---- scan -------------------------------------------------------------------------------------


def _fixed_list(col, root: Path, rel: str, feature: str) -> np.ndarray:
    """A parquet column of fixed-size lists / scalars -> float32 (n, D)."""
    import pyarrow as pa

    if (
        pa.types.is_fixed_size_list(col.type)
        or pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        values = col.combine_chunks()
        try:
            arr = np.asarray(values.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            return arr.reshape(len(values), -1)
        except ValueError:
            raise DataError(
                f"{root}: {rel}: {feature}: rows have different lengths; re-create the dataset"
            ) from None
    return np.asarray(col.to_numpy(), dtype=np.float32).reshape(len(col), -1)


def scan_lerobot(path: str, cfg: DataConfig) -> FileScan:
    """Check a LeRobotDataset v3 root and read its low-dim data into a FileScan (see module doc).

    Raises:
        DataError: any problem with the dataset, naming the root, file and key.
    """
    import pyarrow.parquet as pq

    root = resolve_root(path)
    info = read_info(root)
    features: dict[str, Any] = info["features"]
    fps = float(info["fps"])
    cam_features = [k for k, v in features.items() if isinstance(v, dict) and v.get("dtype") in CAMERA_DTYPES]
    for k in cfg.lerobot_image_map:
        if k not in cam_features:
            raise DataError(
                f"{root}: data.lerobot_image_map names {k!r}, not a camera of this dataset (cameras: "
                f"{', '.join(cam_features) or 'none'}); fix or remove the entry"
            )
    cam_names = {k: cfg.lerobot_image_map.get(k, default_image_key(k)) for k in cam_features}
    dup = [v for v in cam_names.values() if list(cam_names.values()).count(v) > 1]
    if dup:
        raise DataError(
            f"{root}: cameras map to the same image key {dup[0]!r} ({cam_names}); set data.lerobot_image_map"
        )
    state_names = {
        k: default_state_key(k)
        for k, v in features.items()
        if k.startswith("observation.") and k not in cam_features and isinstance(v, dict)
    }
    image_feats = _pick(
        root,
        cfg.image_keys if cfg.image_keys is not None else cam_features,
        cam_names,
        "camera",
        "data.image_keys",
    )
    if not image_feats:
        raise DataError(f"{root}: meta/info.json lists no camera (dtype video or image); set data.image_keys")
    if cfg.state_keys is not None:
        state_feats = _pick(root, cfg.state_keys, state_names, "state feature", "data.state_keys")
    else:
        state_feats = [DEFAULT_STATE] if DEFAULT_STATE in features else []
    action = DEFAULT_ACTION if cfg.action_key == "actions" else cfg.action_key
    if action not in features:
        raise DataError(
            f"{root}: meta/info.json has no feature {action!r} (features: {', '.join(features)}); "
            "set data.action_key to the action feature"
        )
    cameras = {
        cam_names[k]: _Camera(k, features[k]["dtype"], _feature_hw(root, k, features[k])) for k in image_feats
    }
    hws = {c.hw for c in cameras.values()}
    if len(hws) > 1:
        raise DataError(
            f"{root}: cameras have different sizes ({ {c.feature: c.hw for c in cameras.values()} }); "
            "select cameras of one size with data.image_keys"
        )

    eps = _episodes(root)
    tasks = _tasks(root)
    n_eps = len(eps["episode_index"])
    data_cols = {"index", "episode_index", "frame_index", "task_index"}

    # the data file of each episode (columns absent from meta/episodes mean chunk 0 / file 0)
    data_chunks = eps.get("data/chunk_index") or [0] * n_eps
    data_files = eps.get("data/file_index") or [0] * n_eps
    ep_files = [
        root / info["data_path"].format(chunk_index=int(c), file_index=int(i))
        for c, i in zip(data_chunks, data_files)
    ]
    files = sorted(set(ep_files))  # every data file the episodes reference, in (chunk, file) order
    low_dim = [action, *state_feats]
    # the features info.json promises in the data files: everything but video cameras
    promised = [k for k, v in features.items() if isinstance(v, dict) and v.get("dtype") != "video"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in [*low_dim, *sorted(data_cols)]}
    file_rows: dict[Path, int] = {}  # file -> its first global row
    n_rows = 0
    for f in files:
        rel = str(f.relative_to(root))
        if not f.is_file():
            raise DataError(
                f"{root}: {rel}: data file not found (named by meta/episodes); re-download the dataset"
            )
        try:
            names = pq.read_schema(f).names
        except Exception as exc:
            raise DataError(
                f"{root}: {rel}: cannot read the parquet file ({exc}); re-download the dataset"
            ) from None
        missing = [k for k in promised if k not in names]
        if missing:
            raise DataError(
                f"{root}: {rel}: feature {missing[0]!r} is in meta/info.json but not in the data file "
                f"(columns: {', '.join(names)}); the dataset is inconsistent: re-create it"
            )
        miss_idx = sorted(data_cols - set(names))
        if miss_idx:
            raise DataError(
                f"{root}: {rel}: column {miss_idx[0]!r} missing; re-create the dataset with lerobot"
            )
        table = _read_parquet(f, root, [*low_dim, *sorted(data_cols)])
        for k in low_dim:
            parts[k].append(_fixed_list(table.column(k), root, rel, k))
        for k in data_cols:
            parts[k].append(np.asarray(table.column(k).to_numpy(), dtype=np.int64))
        file_rows[f] = n_rows
        n_rows += table.num_rows
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    index = cols["index"]
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]

    demos, skipped, frame_eps = [], [], {}
    dims: dict[str, int] = {}
    ep_task_lists = eps.get("tasks") or [None] * n_eps
    for e in range(n_eps):
        ep_idx = int(eps["episode_index"][e])
        name = f"episode_{ep_idx}"
        lo, hi, length = (int(eps[k][e]) for k in ("dataset_from_index", "dataset_to_index", "length"))
        where = f"{root}: meta/episodes: episode {ep_idx}"
        if hi - lo != length or length <= 0:
            raise DataError(
                f"{where}: dataset_from_index..dataset_to_index = {lo}..{hi} does not hold its length "
                f"{length}; the metadata is inconsistent: re-create the dataset"
            )
        a, b = np.searchsorted(sorted_index, [lo, hi])
        rows = order[a:b]
        if (
            b - a != length
            or not (cols["episode_index"][rows] == ep_idx).all()
            or not (cols["frame_index"][rows] == np.arange(length)).all()
        ):
            found = np.unique(cols["episode_index"][rows]).tolist()
            raise DataError(
                f"{where}: rows {lo}..{hi - 1} ({length} frames) do not match the data files (found "
                f"{b - a} rows with index in that range, episode_index {found}); meta/episodes and data/ "
                "disagree: re-create the dataset or re-download it"
            )
        actions = cols[action][rows]
        state_parts = []
        for k in state_feats:
            state_parts.append(cols[k][rows])
            dims.setdefault(k, cols[k].shape[1])
        state = np.concatenate(state_parts, 1) if state_parts else np.zeros((length, 0), np.float32)
        if not (np.isfinite(actions).all() and np.isfinite(state).all()):
            if cfg.bad_demos == "error":
                raise DataError(
                    f"{where}: NaN/Inf in {action} or state; fix the data or set data.bad_demos=skip"
                )
            skipped.append(name)
            continue
        task_idx = int(cols["task_index"][rows[0]])
        ep_tasks = ep_task_lists[e] or []
        task = tasks.get(task_idx) or (ep_tasks[0] if ep_tasks else None) or cfg.instruction
        if not task:
            raise DataError(
                f"{where}: no task string (task_index {task_idx} not in meta/tasks.parquet); set data.instruction"
            )
        f = ep_files[e]
        frame_lo = int(rows[0]) - file_rows[f]
        if not (rows == np.arange(rows[0], rows[0] + length)).all():
            raise DataError(
                f"{where}: rows are not stored contiguously in {f.relative_to(root)}; re-create the dataset"
            )
        videos = {}
        for ours, cam in cameras.items():
            if cam.mode != "video":
                continue
            pre = f"videos/{cam.feature}/"
            try:
                chunk, fidx = int(eps[pre + "chunk_index"][e]), int(eps[pre + "file_index"][e])
                t0 = float(eps[pre + "from_timestamp"][e])
            except KeyError:
                raise DataError(
                    f"{where}: meta/episodes has no {pre}chunk_index/file_index/from_timestamp for camera "
                    f"{cam.feature}; re-create the dataset"
                ) from None
            template = info.get("video_path")
            if not isinstance(template, str):
                raise DataError(f"{root}: meta/info.json: 'video_path' missing but {cam.feature} is a video")
            vpath = root / template.format(video_key=cam.feature, chunk_index=chunk, file_index=fidx)
            if not vpath.is_file():
                raise DataError(
                    f"{root}: {vpath.relative_to(root)}: video file not found (camera {cam.feature}, "
                    f"episode {ep_idx}); re-download the dataset"
                )
            videos[ours] = (vpath, t0, length)
        frame_eps[name] = {"rows": (f, frame_lo, frame_lo + length), "videos": videos}
        demos.append(Demo(name, actions, state, task.strip(), task.strip()))
    if skipped:
        warnings.warn(
            f"{root}: skipped {len(skipped)} of {n_eps} episodes with NaN/Inf values (data.bad_demos=skip)",
            stacklevel=2,
        )
    if not demos:
        raise DataError(f"{root}: no episode left to train on")
    last_time: dict[Path, tuple[float, str]] = {}  # video file -> (last frame time needed, camera)
    for ep in frame_eps.values():
        for key, (vpath, t0, length) in ep["videos"].items():
            t = t0 + (length - 1) / fps
            last_time[vpath] = (max(t, last_time.get(vpath, (t, key))[0]), key)
    for vpath, (t, key) in last_time.items():
        _probe_video(root, vpath, cameras[key], t, fps)
    masks = _splits(root, info, [d.name for d in demos])
    frames = LeRobotFrames(root, fps, cameras, frame_eps)
    return FileScan(
        str(path),
        LAYOUT,
        tuple(cameras),
        tuple(state_names[k] for k in state_feats),
        tuple(dims.get(k, 0) for k in state_feats),
        next(iter(hws)),
        demos,
        masks,
        skipped,
        frames=frames,
        stats=_stats(root, action, state_feats),
    )


def _probe_video(root: Path, path: Path, cam: _Camera, last: float, fps: float) -> None:
    """Decode a video file's first frame and the last one an episode needs (one seek), so a
    missing, damaged or truncated file fails while the data is built, not in the middle of training."""
    import av

    where = f"{root}: {path.relative_to(root)}"
    tol = 0.5 / fps
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise ValueError("no decodable frame")
            container.seek(int(max(last, 0.0) / stream.time_base), stream=stream)
            end = max((f.time for f in _until(container.decode(stream), last + tol)), default=None)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise DataError(
            f"{where}: cannot decode (camera {cam.feature}): {exc}; the video file is damaged or not a "
            "video: re-download the dataset"
        ) from None
    if (first.height, first.width) != cam.hw:
        raise DataError(
            f"{where}: frames are {(first.height, first.width)} but meta/info.json says {cam.hw} for "
            f"{cam.feature}; re-create the dataset"
        )
    if end is None or end < last - tol:
        raise DataError(
            f"{where}: the episodes need frames up to t={last:.3f} s, "
            f"{'the file has none there' if end is None else f'the file ends at t={end:.3f} s'} "
            f"(camera {cam.feature}); the file is truncated: re-download the dataset"
        )


def _until(frames: Iterator, t_max: float) -> Iterator:
    for f in frames:
        if f.time is not None and f.time > t_max:
            return
        yield f


def _splits(root: Path, info: Mapping[str, Any], names: list[str]) -> dict[str, list[str]]:
    """``mask/train``/``mask/valid`` from info.json ``splits`` when it names a validation split.

    LeRobot writes ``"train": "0:N"`` (every episode) and nothing else, which says no split:
    those datasets are split like any file without masks (``data.split``).
    """
    splits = info.get("splits") or {}
    valid_key = next((k for k in VALID_SPLITS if k in splits), None)
    if valid_key is None:
        return {}
    out = {}
    for ours, key in (("train", "train"), ("valid", valid_key)):
        if key not in splits:
            continue
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(splits[key]))
        if m is None:
            raise DataError(f"{root}: meta/info.json: splits.{key} = {splits[key]!r} is not 'start:stop'")
        lo, hi = int(m.group(1)), int(m.group(2))
        out[ours] = [n for n in names if lo <= int(n.rsplit("_", 1)[1]) < hi]
    return out


def _stats(root: Path, action: str, state_feats: Sequence[str]) -> dict[str, dict[str, np.ndarray]] | None:
    """``meta/stats.json`` for the action and the concatenated state, or None when absent."""
    f = root / "meta" / "stats.json"
    if not f.is_file():
        return None
    raw = _read_json(f, "re-download the dataset or set data.norm_stats=compute")
    out: dict[str, dict[str, np.ndarray]] = {}
    for ours, feats in (("action", [action]), ("state", list(state_feats))):
        if not feats:
            continue
        per: dict[str, list[np.ndarray]] = {}
        for k in feats:
            if k not in raw:
                return None
            for s, v in raw[k].items():
                per.setdefault(s, []).append(np.asarray(v, dtype=np.float64).reshape(-1))
        out[ours] = {s: np.concatenate(v) for s, v in per.items() if len(v) == len(feats)}
    return out


# ---- conversion -------------------------------------------------------------------------------


def convert_to_hdf5(
    path: str, out: str | Path, cfg: DataConfig | None = None, valid_fraction: float = 0.1, seed: int = 0
) -> Path:
    """Write a v3 root as an HDF5 file in our (robomimic-compatible) layout; returns its path.

    Each episode becomes ``data/demo_<i>`` (episodes in index order) with ``obs/<image key>``
    uint8 (T, H, W, 3), ``obs/<state key>`` float32, ``actions``, ``rewards`` (0), ``dones`` (1 at
    the end), ``states`` (the flat state, float64), attrs ``language_instruction`` and ``task`` (the
    episode's task string) and ``lerobot_episode_index``. ``data.attrs["obs_keys"]`` names the
    cameras and state keys, so the file reads back with no key settings. ``mask/train`` and
    ``mask/valid`` keep the dataset's own split when info.json has one, else hold out
    ``valid_fraction`` of the episodes (seeded).
    """
    import h5py

    from vla_ft.data.writer import DemoWriter

    cfg = cfg or DataConfig(paths=[str(path)])
    scan = scan_lerobot(str(path), cfg)
    info = read_info(resolve_root(path))
    first = scan.demos[0].instruction
    env_args = {"env_name": info.get("robot_type") or "lerobot", "type": "lerobot", "fps": info["fps"]}
    problem = {"problem_name": Path(str(path)).name, "language_instruction": first, "source": LAYOUT}
    splits = np.cumsum([0, *scan.state_dims])
    with DemoWriter(out, env_args, problem) as w:
        for demo in scan.demos:
            obs = {k: scan.frames.episode(demo.name, k) for k in scan.image_keys}
            for key, lo, hi in zip(scan.state_keys, splits[:-1], splits[1:]):
                obs[key] = demo.state[:, lo:hi]
            dones = np.zeros(demo.length, np.uint8)
            dones[-1] = 1
            attrs = {
                "language_instruction": demo.instruction,
                "task": demo.task,
                "lerobot_episode_index": int(demo.name.rsplit("_", 1)[1]),
            }
            w.add_demo(
                obs,
                demo.actions,
                np.zeros(demo.length, np.float32),
                dones,
                demo.state.astype(np.float64),
                attrs,
            )
            scan.frames.forget()  # written: free the decoded frames
        w.set_obs_keys({"image": list(scan.image_keys), "state": list(scan.state_keys)})
        path_out = w.close(valid_fraction=valid_fraction if not scan.masks else 0.0, seed=seed)
    with h5py.File(path_out, "a") as h5:
        if scan.masks:  # the dataset's own split, by the converted demo names
            names = {d.name: f"demo_{i}" for i, d in enumerate(scan.demos)}
            for key in ("train", "valid"):
                del h5[f"mask/{key}"]
                chosen = [names[n].encode() for n in scan.masks.get(key, [])]
                if key == "train" and "train" not in scan.masks:
                    valid = set(scan.masks.get("valid", []))
                    chosen = [names[d.name].encode() for d in scan.demos if d.name not in valid]
                h5.create_dataset(f"mask/{key}", data=np.array(chosen, dtype="S32"))
    return path_out
