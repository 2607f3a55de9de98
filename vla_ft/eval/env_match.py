"""What the env check compares: one built env (an :class:`~vla_ft.eval.env_check.EnvSpec`) against
what the model will read from it, and the instruction to feed an env that gives none.

* observation keys: every image and state key the model reads;
* images: uint8 (H, W, 3), with the aspect ratio of the data's (or the model's) images. The policy
  resizes every frame to its input size (``vla_ft.data.transforms.obs_to_inputs``), so another size
  runs; a size that reaches the model through a resize the training frames did not go through is a
  warning, another aspect ratio (stretched images) an error;
* state: each state key's number of values (a checkpoint knows only their total);
* the action dimension.

A mismatch is ONE :class:`~vla_ft.errors.VLAFTError` whose single line names the key and the fix.
When an env gives no instruction (a gymnasium id without ``env.instruction``), evaluation feeds the
training instruction of that task (:func:`fallback_instruction`); a configured ``env.instruction``
that matches none of the training instructions is a warning (:func:`instruction_warning`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vla_ft.errors import CheckpointError, EnvError
from vla_ft.eval.env_check import EnvSpec, split_tasks


@dataclass(frozen=True)
class Expected:
    """What the model will read from the env.

    Attributes:
        source: who expects it, for messages (``the dataset``, ``the checkpoint``).
        image_keys: camera keys the model reads.
        state_keys: state keys, concatenated in this order.
        state_dims: values of each state key (None: only ``state_dim``, their total, is known).
        state_dim: the total.
        action_dim: A.
        image_size: (H, W) the model is fed (every frame is resized to it).
        recorded_size: (H, W) of the dataset's stored images (None: unknown).
        instructions: task -> its training instructions.
    """

    source: str
    image_keys: tuple[str, ...]
    state_keys: tuple[str, ...]
    state_dims: tuple[int, ...] | None
    state_dim: int
    action_dim: int
    image_size: tuple[int, int] | None
    recorded_size: tuple[int, int] | None = None
    instructions: dict[str, list[str]] = field(default_factory=dict)


def expected_from_data(info: Any, scan: Any) -> Expected:
    """The expectations of a run about to train: its ``DatasetInfo`` and the first file's scan."""
    return Expected(
        source="the dataset",
        image_keys=tuple(info.image_keys),
        state_keys=tuple(info.state_keys),
        state_dims=tuple(int(d) for d in scan.state_dims),
        state_dim=int(info.state_dim),
        action_dim=int(info.action_dim),
        image_size=tuple(info.image_size) if info.image_size else None,
        recorded_size=tuple(scan.image_hw) if scan.image_hw else None,
        instructions=dict(info.task_instructions or {}),
    )


def expected_from_policy(policy: Any) -> Expected | None:
    """A checkpoint's expectations (its ``dims``); None for a policy without them (random, expert)."""
    dims = getattr(policy, "dims", None)
    if dims is None or getattr(policy, "runs_in_worker", False):
        return None
    return Expected(
        source="the checkpoint",
        image_keys=tuple(dims.image_keys),
        state_keys=tuple(dims.state_keys),
        state_dims=None,
        state_dim=int(dims.state_dim),
        action_dim=int(dims.action_dim),
        image_size=tuple(dims.image_size) if dims.image_size else None,
        instructions=dict(getattr(dims, "instructions", None) or {}),
    )


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _missing_key_fix(env_cfg: Any, key: str, image: bool, source: str) -> str:
    if env_cfg.type == "gym":
        return f"map it with env.{'image_map' if image else 'state_map'}.{key}=<source>"
    if env_cfg.type == "vla_ft" and image and key.endswith("_image"):
        return f"add camera {key.removesuffix('_image')!r} to env.cameras"
    if source == "the dataset":
        return f"set data.{'image_keys' if image else 'state_keys'} to keys the env gives"
    return "evaluate in an env that gives it (the one the checkpoint was trained for)"


def _state_fix(env_cfg: Any, key: str, want: int, source: str) -> str:
    if env_cfg.type == "gym":
        return f"change env.state_map.{key} to give {want} values (e.g. 'obs[a:b]')"
    if source == "the dataset":
        return (
            f"the data was not recorded in this env: set data.state_keys without {key!r}, or evaluate "
            f"in the env the data came from"
        )
    return "evaluate in the env the checkpoint was trained for"


def _env_key(env_cfg: Any) -> str:
    return {"gym": "env.gym_id", "robosuite": "env.env_name"}.get(env_cfg.type, "env.task")


def check_spec(spec: EnvSpec, expected: Expected, env_cfg: Any) -> list[str]:
    """Compare one env's spec with what the model expects.

    Returns:
        Warnings (one line each): an image size that reaches the model through a resize the
        training frames did not go through.

    Raises:
        CheckpointError: a checkpoint's action dim differs from the env's.
        EnvError: an observation key is missing, an image is not uint8 (H, W, 3) or has another
            aspect ratio, a state key gives another number of values, or (dataset) the action dim
            differs. One line naming the key and the fix.
    """
    src, env = expected.source, spec.label
    if spec.action_dim != expected.action_dim:
        if src == "the checkpoint":  # the wording evaluation always used (policies.check_policy)
            raise CheckpointError(
                f"policy action_dim={expected.action_dim} does not match env {env!r} action dim "
                f"{spec.action_dim}: evaluate on the task the checkpoint was trained for (env.task / env.gym_id)"
            )
        raise EnvError(
            f"env {env!r} takes {spec.action_dim}-dim actions but {src}'s actions have {expected.action_dim} "
            f"dims: set {_env_key(env_cfg)} to the env the data was recorded in"
        )
    for keys, image in ((expected.image_keys, True), (expected.state_keys, False)):
        for key in keys:
            if key not in spec.obs:
                raise EnvError(
                    f"env {env!r} gives no observation {key!r}, one of {src}'s {'image' if image else 'state'} "
                    f"keys {list(keys)} (the env gives {sorted(spec.obs)}): "
                    f"{_missing_key_fix(env_cfg, key, image, src)}"
                )
    resized = {key: hw for key in expected.image_keys if (hw := _check_image(spec, expected, env_cfg, key))}
    _check_state(spec, expected, env_cfg)
    if not resized:
        return []
    ref = expected.recorded_size or expected.image_size
    fix = f"env.image_size={ref[0]}" if ref[0] == ref[1] else f"the env's cameras at {_hw(ref)}"
    return [  # one line for all cameras
        f"env {env!r} image{'s' if len(resized) > 1 else ''} {', '.join(map(repr, resized))} "
        f"{'are' if len(resized) > 1 else 'is'} {'/'.join(sorted({_hw(hw) for hw in resized.values()}))}, "
        f"{src}'s are {_hw(ref)}: evaluation resizes them to the model's {_hw(expected.image_size or ref)}, "
        f"which the training frames were not; render at the data's size ({fix})"
    ]


def _check_image(spec: EnvSpec, expected: Expected, env_cfg: Any, key: str) -> tuple[int, int] | None:
    """Raise for an image the model cannot take as it took the training images; return the env's
    (H, W) when only its size differs and the resize to the model's size is not the training one."""
    shape, dtype = spec.obs[key]
    if dtype != "uint8" or len(shape) != 3 or shape[-1] != 3:
        fix = "env.image_map" if env_cfg.type == "gym" else "the env's cameras"
        raise EnvError(
            f"env {spec.label!r} observation {key!r} is {dtype} {shape}, not a uint8 (H, W, 3) image as "
            f"{expected.source}'s image key {key!r} is: give it an RGB image ({fix})"
        )
    env_hw = (int(shape[0]), int(shape[1]))
    model = expected.image_size
    ref = expected.recorded_size or model
    if ref is None or env_hw in (ref, model):
        return None
    if env_hw[0] * ref[1] != env_hw[1] * ref[0]:  # another aspect ratio: the resize would stretch it
        fix = f" (env.image_size={ref[0]})" if ref[0] == ref[1] else ""
        raise EnvError(
            f"env {spec.label!r} image {key!r} is {_hw(env_hw)} (H x W) but {expected.source}'s images are "
            f"{_hw(ref)}: resized to the model's {_hw(model or ref)} they would be stretched; render the "
            f"env's cameras at {_hw(ref)}{fix}"
        )
    # a checkpoint does not know its data's stored size: the resize may be the training one
    return env_hw if expected.source == "the dataset" else None


def _state_values(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_state(spec: EnvSpec, expected: Expected, env_cfg: Any) -> None:
    src, got = expected.source, {}
    for key in expected.state_keys:
        shape, _ = spec.obs[key]
        if len(shape) > 1:
            fix = f"map it to a slice (env.state_map.{key})" if env_cfg.type == "gym" else "use a vector key"
            raise EnvError(
                f"env {spec.label!r} observation {key!r} has shape {shape}, but {src}'s state key {key!r} is "
                f"a vector: {fix}"
            )
        got[key] = _state_values(shape)
    if expected.state_dims is not None:
        for key, want in zip(expected.state_keys, expected.state_dims, strict=True):
            if got[key] != want:
                raise EnvError(
                    f"env {spec.label!r} observation {key!r} has {got[key]} values, {src}'s state key {key!r} "
                    f"has {want}: {_state_fix(env_cfg, key, want, src)}"
                )
    total = sum(got.values())
    if total != expected.state_dim:
        parts = " + ".join(f"{k} {n}" for k, n in got.items()) or "none"
        raise EnvError(
            f"env {spec.label!r} state keys give {total} values ({parts}), {src}'s state has "
            f"{expected.state_dim}: evaluate in the env {src.removeprefix('the ')} was made for, or map "
            f"the state keys to match (env.state_map for gym ids)"
        )


def check_envs(specs: list[EnvSpec], expected: Expected | None, env_cfg: Any) -> list[str]:
    """:func:`check_spec` for every task's env; the warnings of all of them (duplicates once)."""
    if expected is None:
        return []
    out: list[str] = []
    for spec, cfg in zip(specs, split_tasks(env_cfg), strict=True):
        out += [w for w in check_spec(spec, expected, cfg) if w not in out]
    return out


# ---------------------------------------------------------------------------------- instructions


def fallback_instruction(spec: EnvSpec, env_cfg: Any, instructions: dict[str, list[str]]) -> str | None:
    """The instruction evaluation feeds when the env gives none, or None (the env's own are used).

    An env gives none when ``env.instruction`` is not set and it reports no instruction, or only
    its own task name (the gym adapter's stand-in). Then: the training data's only instruction, or
    the only one of the training task the env reports; several to choose from is an error.

    Raises:
        EnvError: the training data has several instructions and none is the env's task's only one.
    """
    if getattr(env_cfg, "instruction", None):
        return None
    if spec.instruction and spec.instruction not in (spec.task, spec.name):
        return None  # the env words its own (this suite, robosuite)
    every = list(dict.fromkeys(i for its in instructions.values() for i in its))
    if not every:
        return None  # an older checkpoint: no training instructions known, the env's name stays
    if len(every) == 1:
        return every[0]
    own = instructions.get(spec.task) or instructions.get(spec.name) or []
    if len(own) == 1:
        return own[0]
    shown = ", ".join(repr(i) for i in (own or every)[:3]) + (", ..." if len(own or every) > 3 else "")
    raise EnvError(
        f"env {spec.label!r} gives no instruction and the policy was trained on {len(every)} "
        f"({shown}); set env.instruction to the one this env's task needs"
    )


def instruction_warning(env_cfg: Any, instructions: dict[str, list[str]]) -> str | None:
    """One line when ``env.instruction`` matches none of the training instructions (None: it does,
    none is configured, or none are known)."""
    text = getattr(env_cfg, "instruction", None)
    every = list(dict.fromkeys(i for its in instructions.values() for i in its))
    if not text or not every or text in every:
        return None
    shown = ", ".join(repr(i) for i in every[:3]) + (", ..." if len(every) > 3 else "")
    return (
        f"env.instruction={text!r} is none of the {len(every)} instructions the policy was "
        f"trained on ({shown}); the policy may not follow it"
    )
