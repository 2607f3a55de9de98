"""The run configuration: a typed dataclass tree mirrored in YAML.

* ``load_config(path, overrides)`` reads a YAML file (``base: other.yaml`` inherits, deep-merged),
  applies dotted overrides (``train.lr=3e-5``) and builds a :class:`Config`.
* Keys are strict: an unknown key is a :class:`ConfigError` naming it and the closest valid key.
* Values are type-checked against the dataclass annotations (``int`` widens to ``float``, nothing
  else is coerced) and each section validates itself in ``__post_init__``.
* ``save_config(cfg, run_dir)`` writes the resolved config into a run directory.

Sections own their fields: data (dataset), collect (demo collection), env (simulation task),
model, loss, train, eval, log. Each section validates its own values at construction, before any
data loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vla_ft.errors import ConfigError
from vla_ft.io import write_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def _check(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Image augmentation applied to training batches only (never at validation or evaluation)."""

    enabled: bool = True
    shift: int = 4  # random shift: pad by `shift` px (replicate) and crop back, per sample
    crop_scale: float = 1.0  # random resized crop area lower bound (1.0 = off); e.g. 0.8
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (0 = off), e.g. 0.4
    rotation_deg: float = 0.0  # max small rotation (0 = off)

    def __post_init__(self) -> None:
        _check(self.shift >= 0, "data.augment.shift", self.shift, "use a pixel count >= 0")
        _check(
            0.0 < self.crop_scale <= 1.0, "data.augment.crop_scale", self.crop_scale, "use a value in (0, 1]"
        )
        _check(self.color_jitter >= 0.0, "data.augment.color_jitter", self.color_jitter, "use a value >= 0")
        _check(self.rotation_deg >= 0.0, "data.augment.rotation_deg", self.rotation_deg, "use degrees >= 0")


@dataclass
class DataConfig:
    """Trajectory HDF5 files and how samples are cut from them."""

    paths: list[str] = field(default_factory=lambda: ["data/pick_place.hdf5"])
    weights: list[float] | None = None  # sampling weight per file (multi-file / multi-task mixing)
    layout: Literal["auto", "robomimic", "libero"] = "auto"
    image_keys: list[str] | None = None  # None: the layout's default camera keys
    state_keys: list[str] | None = None  # None: the layout's default proprio keys
    action_key: str = "actions"
    instruction: str | None = None  # fallback when the file carries no language
    instruction_max_tokens: int = 64  # instructions are padded/truncated to this many tokens
    image_size: int | None = None  # resize images to this square size (None: keep the file's)
    history: int = 1  # observation frames per sample (t-history+1 .. t)
    chunk: int = 4  # action chunk length H (t .. t+H-1)
    normalization: Literal["mean_std", "min_max", "quantile", "none"] = "mean_std"
    # statistics behind `normalization`: compute (from the training demos) or dataset (a LeRobot
    # dataset's own meta/stats.json; every path must then be a LeRobotDataset v3 root)
    norm_stats: Literal["compute", "dataset"] = "compute"
    # LeRobotDataset camera feature -> our image key; unlisted cameras map
    # observation.images.<name> -> <name>_image
    lerobot_image_map: dict[str, str] = field(default_factory=dict)
    split: Literal["auto", "mask", "random"] = "auto"  # auto: mask/train+mask/valid when present
    val_fraction: float = 0.1  # share of demos held out when splitting randomly (by demo)
    max_demos: int | None = None  # use at most this many training demos (None: all)
    cache_images: Literal["auto", "ram", "lazy"] = "auto"
    cache_budget_gb: float = 4.0  # `auto` caches images in RAM when they fit this budget
    num_workers: int = 0
    # NaN/Inf or unreadable data: fail, or skip the demo with a warning (skip also reads every image
    # chunk at start, so a damaged one cannot stop training later)
    bad_demos: Literal["error", "skip"] = "error"
    collect_if_missing: bool = False  # run demo collection when data.paths[0] does not exist
    # end-effector position state key for the `waypoint` task term (auto: the first state key named
    # like ee_pos / eef_pos; null: none). The gripper command is the last action dimension.
    waypoint_key: str | None = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check(
            len(self.paths) > 0,
            "data.paths",
            self.paths,
            "give at least one HDF5 file or LeRobotDataset v3 root",
        )
        for src, dst in self.lerobot_image_map.items():
            _check(
                bool(src) and bool(dst) and "/" not in dst,
                f"data.lerobot_image_map.{src}",
                dst,
                "map a LeRobot camera feature (e.g. observation.images.front) to an image key without '/' "
                "(e.g. agentview_image)",
            )
        targets = list(self.lerobot_image_map.values())
        dup = next((t for t in targets if targets.count(t) > 1), None)
        _check(dup is None, "data.lerobot_image_map", self.lerobot_image_map, f"two cameras map to {dup!r}")
        if self.weights is not None:
            _check(
                len(self.weights) == len(self.paths) and all(w > 0 for w in self.weights),
                "data.weights",
                self.weights,
                f"give one positive weight per file in data.paths ({len(self.paths)})",
            )
        _check(
            self.instruction_max_tokens >= 1,
            "data.instruction_max_tokens",
            self.instruction_max_tokens,
            "use 1 or more",
        )
        _check(self.history >= 1, "data.history", self.history, "use 1 or more frames")
        _check(self.chunk >= 1, "data.chunk", self.chunk, "use an action chunk of 1 or more steps")
        _check(
            0.0 <= self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "use a value in [0, 1)"
        )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more workers")
        _check(self.cache_budget_gb >= 0, "data.cache_budget_gb", self.cache_budget_gb, "use a size >= 0")
        if self.image_size is not None:
            _check(self.image_size >= 8, "data.image_size", self.image_size, "use at least 8 px")
        if self.max_demos is not None:
            _check(self.max_demos >= 1, "data.max_demos", self.max_demos, "use 1 or more, or null for all")


@dataclass
class CollectConfig:
    """Scripted-expert demonstration collection (scripts/collect_demos.py)."""

    tasks: list[str] = field(default_factory=lambda: ["pick_place"])
    episodes: int = 100  # successful episodes to keep per task
    output: str = "data/pick_place.hdf5"
    workers: int = 2
    seed: int = 0  # episode i of a task uses reset seed `seed + i` (+ a per-task offset)
    action_noise: float = 0.0  # std of Gaussian noise added to expert actions
    keep_failures: bool = False
    valid_fraction: float = 0.1  # written as mask/valid (by demo)
    max_attempts_factor: float = 2.0  # give up after episodes * factor attempts per task
    # keep recording the expert this many steps after success (e.g. the release and retreat of
    # pick_place: without them a demo holds 2 open-gripper frames and policies never let go)
    post_success_steps: int = 0
    # which goals demos are collected on: all, or seen (never one of a task's held-out combinations,
    # so env.goals=held_out scores what the demos left out; docs/envs.md). Demos always use the
    # training wordings, never paraphrases
    goals: Literal["all", "seen"] = "all"

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "collect.tasks", self.tasks, "name at least one task")
        _check(
            self.post_success_steps >= 0,
            "collect.post_success_steps",
            self.post_success_steps,
            "use 0 or more",
        )
        _check(self.episodes >= 1, "collect.episodes", self.episodes, "use 1 or more")
        _check(self.workers >= 1, "collect.workers", self.workers, "use 1 or more")
        _check(self.action_noise >= 0, "collect.action_noise", self.action_noise, "use a std >= 0")
        _check(0 <= self.valid_fraction < 1, "collect.valid_fraction", self.valid_fraction, "use [0, 1)")
        _check(
            self.max_attempts_factor >= 1, "collect.max_attempts_factor", self.max_attempts_factor, "use >= 1"
        )


@dataclass
class EnvConfig:
    """The simulated task(s) a policy is scored on.

    ``type: vla_ft`` uses this project's MuJoCo suite (``task`` names a registered task, ``tasks``
    several, scored together); ``type: gym`` wraps any registered gymnasium id (``gym_id``) with the
    key mapping below; ``type: robosuite`` rebuilds a robosuite env from the dataset's ``env_args``
    (vla_ft/sim/robosuite_env.py, docs/robosuite.md).
    """

    type: Literal["vla_ft", "gym", "robosuite"] = "vla_ft"
    task: str = "pick_place"
    # several tasks of this suite scored by one evaluation (type vla_ft): eval.episodes of each, every
    # task on the same reset seeds, one report with a per-task table; empty: env.task alone
    tasks: list[str] = field(default_factory=list)
    image_size: int = 64
    cameras: list[str] = field(default_factory=lambda: ["agentview", "wrist"])
    max_steps: int | None = None  # None: the task's default
    # which goals episodes sample (type vla_ft; envs/tasks.py, docs/envs.md): all, seen (never one of
    # the task's held-out color combinations) or held_out (only those; pick_place and stack have them)
    goals: Literal["all", "seen", "held_out"] = "all"
    # which wordings instructions use: train (the templates demos are collected with) or paraphrase
    # (each task's paraphrases, never collected)
    instructions: Literal["train", "paraphrase"] = "train"
    # generic gymnasium adapter (type: gym)
    gym_id: str | None = None
    gym_kwargs: dict[str, Any] = field(default_factory=dict)
    image_map: dict[str, str] = field(default_factory=dict)  # our key -> env obs key / camera
    state_map: dict[str, str] = field(default_factory=dict)
    flip_images: bool = False
    instruction: str | None = None
    success_key: str = "is_success"
    # robosuite env name, e.g. Lift, PickPlaceCan (type: robosuite; null: the dataset's env_args.env_name)
    env_name: str | None = None
    # fields overriding the dataset's env_args.env_kwargs (robosuite.make keyword arguments)
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # the HDF5 file whose data.attrs["env_args"] describe the robosuite env (null: data.paths[0])
    env_args_from: str | None = None
    # robosuite rendering without shadows, reflections, skybox and multisampling (~3x faster on CPU);
    # null: what the dataset's env_args say (collection: false). Demos and evaluation must agree.
    fast_render: bool | None = None

    def __post_init__(self) -> None:
        _check(self.image_size >= 8, "env.image_size", self.image_size, "use at least 8 px")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "env.max_steps", self.max_steps, "use 1 or more, or null")
        dup = next((t for t in self.tasks if self.tasks.count(t) > 1), None)
        _check(dup is None, "env.tasks", self.tasks, f"name each task once ({dup!r} is there twice)")
        if self.type == "gym":
            _check(bool(self.gym_id), "env.gym_id", self.gym_id, "set the gymnasium id for env.type=gym")
        if self.type != "vla_ft":
            what = f"env.type=gym ({self.gym_id})" if self.type == "gym" else "env.type=robosuite"
            _check(
                not self.tasks,
                "env.tasks",
                self.tasks,
                f"it names tasks of this suite, which {what} does not have: use "
                "env.tasks=[] (one env per evaluation), or env.type=vla_ft",
            )
            changed = [
                f"env.{key}={getattr(self, key)!r}"
                for key, default in (("goals", "all"), ("instructions", "train"))
                if getattr(self, key) != default
            ]
            if changed:
                raise ConfigError(
                    f"{' and '.join(changed)} select goals and wordings of this suite's tasks, which "
                    f"{what} does not have: use env.goals=all and env.instructions=train, "
                    f"or env.type=vla_ft"
                )


LORA_TARGETS = ("language", "projector", "vision")


@dataclass
class LoraConfig:
    """LoRA adapters (through peft) instead of full-parameter fine-tuning; ``r: 0`` is off.

    With ``r > 0`` the backbone is frozen and LoRA adapters are injected into the Linear and Conv2d
    layers of the backbone modules named in ``target``; everything outside the backbone (action and
    task heads, action queries, readout, state projection, view embeddings) stays fully trainable.
    Checkpoints hold the merged weights (our format); see vla_ft/models/lora.py.
    """

    r: int = 0  # adapter rank; 0 = off (full fine-tuning)
    alpha: float | None = None  # LoRA scaling is alpha / r; null: 2 * r (a scale of 2 at every rank)
    dropout: float = 0.0  # dropout on the adapter input
    target: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # backbone modules adapted

    def __post_init__(self) -> None:
        _check(self.r >= 0, "model.lora.r", self.r, "use 0 (off: full fine-tuning) or a rank >= 1, e.g. 8")
        if self.alpha is not None:
            _check(self.alpha > 0, "model.lora.alpha", self.alpha, "use a positive alpha, or null for 2 * r")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "use a value in [0, 1)")
        _check(
            len(self.target) > 0,
            "model.lora.target",
            self.target,
            f"name at least one backbone module from: {', '.join(LORA_TARGETS)}",
        )
        for name in self.target:
            _check(
                name in LORA_TARGETS,
                "model.lora.target",
                name,
                f"use module names from: {', '.join(LORA_TARGETS)}",
            )
        _check(
            len(set(self.target)) == len(self.target),
            "model.lora.target",
            self.target,
            "name each module once",
        )

    @property
    def scale_alpha(self) -> float:
        """The alpha given to peft (``alpha`` or ``2 * r``)."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


# model.extra: the knobs each kind of preset reads (vla_ft/models/loading.py for native and vlm,
# vla_ft/models/bc_cnn.py for cnn), plus the flow head's Euler steps, which every kind reads
MODEL_EXTRA_KNOBS: dict[str, tuple[str, ...]] = {
    "native": (
        "vision_kwargs",
        "pool_grid",
        "channels_last",
        "keypoints",
        "film",
        "keypoint_tokens",
        "keypoint_window",
    ),
    "vlm": (),
    "cnn": (
        "channels",
        "strides",
        "keypoints",
        "keypoint_features",
        "text_features",
        "state_features",
        "max_tokens",
        "width",
        "depth",
        "vocab_size",
    ),
}
FLOW_STEPS_KNOB = "num_steps"


@dataclass
class ModelConfig:
    """Which VLA to build or load.

    ``pretrained`` is a checkpoint directory in our format, a hub id, or null; when null the
    ``preset`` is built from config with random weights. Fields set here override the preset.
    """

    pretrained: str | None = None
    preset: str = "tiny"
    vision: str | None = None  # timm model name (overrides the preset)
    vision_pretrained: str | None = None  # local weights file/dir for the timm encoder
    language: str | None = None  # transformers model name/dir or config preset (overrides)
    vlm: str | None = None  # HF vision-language model name/dir used as the joint backbone
    action_head: Literal["continuous", "binned", "flow"] = "continuous"  # flow: SmolVLA checkpoints
    n_bins: int = 256
    bin_range: float = 1.0  # binned head: bins cover [-bin_range, bin_range] in normalized units
    bin_decode: Literal["expectation", "argmax"] = "expectation"  # binned head -> continuous action
    n_action_steps: int | None = None  # select_action: actions executed per chunk (None: whole chunk)
    temporal_ensemble: float | None = None  # select_action: ACT-style weight exp(-k * age); None = off
    action_low: float = -1.0  # predict_action clips env-unit actions to [action_low, action_high]
    action_high: float = 1.0
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    freeze: list[str] = field(default_factory=list)  # module names to freeze (full FT: empty)
    # the preset kind's knobs (MODEL_EXTRA_KNOBS in vla_ft/config.py) and num_steps; others are an error
    extra: dict[str, Any] = field(default_factory=dict)
    lora: LoraConfig = field(default_factory=LoraConfig)  # r > 0: LoRA instead of full fine-tuning

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # ModelConfig(**json) when a checkpoint's config.json is read
            self.lora = LoraConfig(**self.lora)
        knobs = sorted({FLOW_STEPS_KNOB, *(k for kind in MODEL_EXTRA_KNOBS.values() for k in kind)})
        for key in self.extra:
            if key not in knobs:
                raise ConfigError(f"unknown config key 'model.extra.{key}': {_suggest(str(key), knobs)}")
        _check(self.n_bins >= 2, "model.n_bins", self.n_bins, "use 2 or more bins")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "use a value in [0, 1)")
        _check(self.bin_range > 0, "model.bin_range", self.bin_range, "use a positive range, e.g. 1.0")
        if self.n_action_steps is not None:
            _check(
                self.n_action_steps >= 1,
                "model.n_action_steps",
                self.n_action_steps,
                "use 1 or more, or null",
            )
        if self.temporal_ensemble is not None:
            _check(
                self.temporal_ensemble >= 0, "model.temporal_ensemble", self.temporal_ensemble, "use k >= 0"
            )
        _check(
            self.action_low < self.action_high,
            "model.action_low",
            self.action_low,
            f"it must be below model.action_high={self.action_high}",
        )
        for name in self.freeze:
            _check(
                name in ("vision", "language", "projector", "heads"),
                "model.freeze",
                name,
                "use module names from: vision, language, projector, heads",
            )
        if self.lora.r > 0 and self.freeze:
            raise ConfigError(
                f"model.freeze={self.freeze} cannot be combined with model.lora.r={self.lora.r}: LoRA "
                f"already freezes the backbone (choose adapted modules with model.lora.target); "
                f"set model.freeze=[]"
            )

    @property
    def flow_steps(self) -> int | None:
        """``model.extra.num_steps``: Euler steps when a flow head samples (None: the head's own)."""
        return self.extra.get(FLOW_STEPS_KNOB)


@dataclass
class LossConfig:
    """L = w_action * L_action + w_task * L_task."""

    w_action: float = 1.0
    w_task: float = 0.1
    action: Literal["l1", "mse", "huber"] = "l1"
    huber_delta: float = 1.0
    dim_weights: list[float] | None = None  # per action dimension (e.g. up-weight the gripper)
    label_smoothing: float = 0.0  # binned actions and task-id classification
    task_terms: dict[str, float] = field(default_factory=lambda: {"task_id": 1.0, "progress": 1.0})
    gripper_dim: int = -1  # action dimension reported as gripper accuracy (sign agreement)

    def __post_init__(self) -> None:
        _check(self.w_action >= 0, "loss.w_action", self.w_action, "use a weight >= 0")
        _check(self.w_task >= 0, "loss.w_task", self.w_task, "use a weight >= 0")
        _check(self.huber_delta > 0, "loss.huber_delta", self.huber_delta, "use a delta > 0")
        _check(0 <= self.label_smoothing < 1, "loss.label_smoothing", self.label_smoothing, "use [0, 1)")
        if self.dim_weights is not None:
            _check(
                all(w >= 0 for w in self.dim_weights),
                "loss.dim_weights",
                self.dim_weights,
                "use weights >= 0",
            )
        for name, w in self.task_terms.items():
            _check(
                name in ("task_id", "progress", "waypoint", "grounding"),
                "loss.task_terms",
                name,
                "use task terms from: task_id, progress, waypoint, grounding",
            )
            _check(w >= 0, f"loss.task_terms.{name}", w, "use a weight >= 0")


@dataclass
class TrainConfig:
    """The full-parameter training loop."""

    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # global effective batch (micro_batch * grad_accum * world size)
    grad_accum: int = 1
    lr: float | None = None  # peak rate; null: pretrain_lr * lr_scale when both are set, else 1e-4
    pretrain_lr: float | None = None  # with lr_scale: lr = pretrain_lr * lr_scale (a set lr must agree)
    lr_scale: float | None = None
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    layer_decay: float = 1.0  # layer-wise LR decay: lr * decay^(depth from top); 1.0 = off
    module_lr: dict[str, float] = field(default_factory=dict)  # discriminative: module -> lr multiplier
    unfreeze_steps: int = 0  # progressive unfreezing over this many steps (0 = all trainable)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_clip: float = 1.0  # max global grad norm (0 = off); the pre-clip norm is logged
    compile: bool = False
    ema: float | None = None  # EMA decay of weights (e.g. 0.999); evaluated/saved when set
    val_every: int = 200
    eval_every: int = 0  # simulation evaluation every N steps (0 = only at the end)
    save_every: int = 500
    keep_last: int = 2
    # success_rate: the periodic evaluation's overall rate (with env.tasks: every task's episodes)
    best_metric: Literal["val_loss", "success_rate"] = "val_loss"
    patience: int | None = None  # early stopping: evaluations without improvement
    resume: str | None = None  # "auto" (latest in the run dir) or a checkpoint path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: Literal["none", "ddp", "fsdp"] = "none"  # ddp/fsdp: launch with torchrun (docs/scale.md)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: torchao 8-bit state (extra `lowmem`)
    optimizer_in_backward: bool = False  # step each parameter in backward and free its grad at once
    cpu_offload: bool = False  # fsdp: params, grads and optimizer state on CPU (FSDP2 CPUOffloadPolicy)
    deterministic: bool = False
    max_bad_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    out_dir: str = "runs"
    run_name: str | None = None
    threads: int | None = None  # torch intra-op threads on CPU (None: torch default)
    # copy the evaluated (best) checkpoint here with a model card (README.md + card.json); None: no export
    export_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps", self.steps, "use 1 or more optimizer steps")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "use 1 or more")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "use 1 or more")
        _check(
            self.batch_size % self.grad_accum == 0,
            "train.grad_accum",
            self.grad_accum,
            f"it must divide train.batch_size={self.batch_size}",
        )
        self._resolve_lr()
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "use a value >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            self.betas,
            "give two values in [0, 1), e.g. [0.9, 0.999]",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "use 0 or more")
        _check(
            self.warmup_steps <= self.steps,
            "train.warmup_steps",
            self.warmup_steps,
            f"it must not exceed train.steps={self.steps}",
        )
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "use [0, 1]")
        _check(0 < self.layer_decay <= 1, "train.layer_decay", self.layer_decay, "use (0, 1], e.g. 0.95")
        for name, mult in self.module_lr.items():
            _check(
                name in ("vision", "language", "projector", "heads"),
                "train.module_lr",
                name,
                "use module names from: vision, language, projector, heads",
            )
            _check(mult > 0, f"train.module_lr.{name}", mult, "use a positive multiplier")
        _check(self.unfreeze_steps >= 0, "train.unfreeze_steps", self.unfreeze_steps, "use 0 or more")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "use a norm >= 0 (0 = off)")
        if self.ema is not None:
            _check(0 < self.ema < 1, "train.ema", self.ema, "use a decay in (0, 1), e.g. 0.999")
        for key in ("val_every", "eval_every", "save_every"):
            _check(getattr(self, key) >= 0, f"train.{key}", getattr(self, key), "use 0 or more steps")
        _check(self.keep_last >= 1, "train.keep_last", self.keep_last, "keep at least 1 checkpoint")
        if self.patience is not None:
            _check(self.patience >= 1, "train.patience", self.patience, "use 1 or more, or null")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, "use 1 or more")
        if self.threads is not None:
            _check(self.threads >= 1, "train.threads", self.threads, "use 1 or more")
        self._check_scale_options()

    def _resolve_lr(self) -> None:
        """``lr`` from ``pretrain_lr * lr_scale`` when those are set (a set ``lr`` must agree), else
        1e-4 when unset: after this ``lr`` is the peak rate, and the saved config says so."""
        if (self.pretrain_lr is None) != (self.lr_scale is None):
            raise ConfigError("train.lr_scale and train.pretrain_lr go together: set both or neither")
        if self.lr_scale is not None:
            _check(0 < self.lr_scale <= 1, "train.lr_scale", self.lr_scale, "use a scale in (0, 1], e.g. 0.1")
            _check(self.pretrain_lr > 0, "train.pretrain_lr", self.pretrain_lr, "use a positive lr")
            derived = self.pretrain_lr * self.lr_scale
            if self.lr is not None and not math.isclose(self.lr, derived, rel_tol=1e-9):
                raise ConfigError(
                    f"train.lr={self.lr:g} disagrees with train.pretrain_lr * train.lr_scale = "
                    f"{self.pretrain_lr:g} * {self.lr_scale:g} = {derived:g}: set train.lr=null (it is "
                    f"computed from them), or set train.pretrain_lr and train.lr_scale to null"
                )
            self.lr = derived
        elif self.lr is None:
            self.lr = 1e-4
        _check(self.lr > 0, "train.lr", self.lr, "use a positive learning rate, e.g. 1e-4")

    def _check_scale_options(self) -> None:
        """Combinations the distributed / memory-saving paths do not support (docs/scale.md)."""
        if self.optimizer_in_backward:
            for key, ok, fix in (
                ("train.grad_accum", self.grad_accum == 1, "set train.grad_accum=1"),
                ("train.grad_clip", self.grad_clip == 0, "set train.grad_clip=0 (needs the global norm)"),
                ("train.parallel", self.parallel == "none", "set train.parallel=none"),
                ("train.optimizer", self.optimizer == "adamw", "use train.optimizer=adamw"),
                ("train.precision", self.precision != "fp16", "use bf16 or fp32 (fp16 needs a grad scaler)"),
                ("train.unfreeze_steps", self.unfreeze_steps == 0, "set train.unfreeze_steps=0"),
            ):
                if not ok:
                    raise ConfigError(
                        f"train.optimizer_in_backward=true does not work with {key}={getattr(self, key[6:])!r}: "
                        f"{fix}, or turn train.optimizer_in_backward off"
                    )
        _check(
            not self.cpu_offload or self.parallel == "fsdp",
            "train.cpu_offload",
            self.cpu_offload,
            "CPU offload is FSDP2's: set train.parallel=fsdp (works with one process too)",
        )
        if self.parallel != "none":
            _check(
                self.unfreeze_steps == 0,
                "train.unfreeze_steps",
                self.unfreeze_steps,
                f"progressive unfreezing is not supported with train.parallel={self.parallel}: use 0",
            )
        if self.parallel == "fsdp":
            _check(
                self.ema is None,
                "train.ema",
                self.ema,
                "EMA is not supported with train.parallel=fsdp (it would hold a full copy per rank): "
                "use null, or train.parallel=ddp",
            )


@dataclass
class EvalConfig:
    """Simulation evaluation (success rate over seeded episodes)."""

    episodes: int = 100
    workers: int = 2
    seed: int = 100_000  # episode i resets with seed + i: disjoint from collection seeds
    max_steps: int | None = None  # None: the task's default
    replan_every: int | None = None  # actions executed open-loop per chunk (None: the whole chunk)
    temporal_ensemble: float | None = None  # exponential weight for temporal ensembling (None: off)
    video: int = 0  # videos to save of each outcome (successes and failures)
    out_dir: str | None = None  # None: <run dir>/eval
    # concurrent episodes (the policy batch), split over workers; results don't depend on workers
    num_envs: int = 8
    worker_timeout_s: float = 300.0  # a worker silent this long counts as crashed (its episodes fail)
    # where the env workers run: spawned processes here, or Ray actors (docs/scale.md); same results
    backend: Literal["local", "ray"] = "local"
    # Ray cluster to join ("auto", "host:port", "ray://host:port"); None: $RAY_ADDRESS if set, else a
    # local Ray started by the first evaluation and kept until the process exits
    ray_address: str | None = None
    ray_num_cpus: float = 1.0  # CPUs each env actor reserves
    ray_num_gpus: float = 0.0  # GPUs each env actor reserves (e.g. 0.25 to share a GPU among 4)

    def __post_init__(self) -> None:
        _check(self.episodes >= 0, "eval.episodes", self.episodes, "use 0 (no final evaluation) or more")
        _check(self.workers >= 1, "eval.workers", self.workers, "use 1 or more")
        if self.replan_every is not None:
            _check(self.replan_every >= 1, "eval.replan_every", self.replan_every, "use 1 or more, or null")
        _check(self.video >= 0, "eval.video", self.video, "use 0 or more")
        _check(self.num_envs >= 1, "eval.num_envs", self.num_envs, "use 1 or more concurrent episodes")
        _check(self.worker_timeout_s > 0, "eval.worker_timeout_s", self.worker_timeout_s, "use seconds > 0")
        _check(self.backend in ("local", "ray"), "eval.backend", self.backend, "use local or ray")
        _check(self.ray_num_cpus > 0, "eval.ray_num_cpus", self.ray_num_cpus, "use CPUs > 0 per env actor")
        _check(self.ray_num_gpus >= 0, "eval.ray_num_gpus", self.ray_num_gpus, "use GPUs >= 0 per env actor")
        address_ok = self.ray_address is None or bool(self.ray_address.strip())
        _check(address_ok, "eval.ray_address", self.ray_address, "use an address (auto, host:port) or null")
        if self.backend == "ray" and not self._ray_installed():
            raise ConfigError("eval.backend=ray needs Ray, which is not installed: pip install -e '.[ray]'")

    @staticmethod
    def _ray_installed() -> bool:
        """Whether ``import ray`` can work, without importing it (a None in sys.modules blocks it)."""
        import importlib.util
        import sys

        if "ray" in sys.modules:
            return sys.modules["ray"] is not None
        return importlib.util.find_spec("ray") is not None


@dataclass
class LogConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "vla-ft"
    entity: str | None = None
    every: int = 10  # log train metrics every N optimizer steps
    progress: bool = True  # console progress bar
    plots: bool = True  # PNG plots in the run dir at the end

    def __post_init__(self) -> None:
        _check(self.every >= 1, "log.every", self.every, "use 1 or more")


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.env.type == "robosuite" and self.env.env_args_from is None:
            # evaluation workers see only the env section: name the file its env is rebuilt from
            self.env.env_args_from = self.data.paths[0]


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, strictly
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict:
        args = typing.get_args(tp) or (str, Any)
        return f"mapping of {_type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid keys: " + ", ".join(valid)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it (dataclasses are built)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
        else:
            for arg in args:
                if arg is type(None):
                    continue
                try:
                    return _convert(value, arg, key)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{key}: unknown value {value!r}{hint}; choose one of {', '.join(map(str, choices))}"
            )
        return value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - an annotation this loader does not know is a programming error
        raise TypeError(f"config field {key} has unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            valid = list(fields)
            raise ConfigError(f"unknown config key {full!r}: {_suggest(str(key), valid)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a plain (already merged) dict, strictly."""
    values = dict(values)
    values.pop("base", None)
    return _build(Config, values, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------
# YAML files, inheritance, overrides
# --------------------------------------------------------------------------------------------


def resolve_config_path(name: str | Path) -> Path:
    """A path as given if it exists, else ``configs/<name>`` (``.yaml`` added when missing)."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [CONFIG_DIR / path.name]
    if path.suffix not in (".yaml", ".yml"):
        candidates.append(CONFIG_DIR / f"{path.name}.yaml")
    for cand in candidates:
        if cand.is_file():
            return cand
    known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(
        f"config file '{name}' not found (looked in . and {CONFIG_DIR}); known configs: {known}"
    )


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML with ``base:`` inheritance resolved (paths relative to the file)."""
    path = path.resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config inheritance loops: {chain}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
        base_path = (path.parent / base) if (path.parent / base).is_file() else resolve_config_path(base)
        values = _deep_merge(read_yaml(base_path, (*_seen, path)), values)
    return values


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys.append(full)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], full + "."))
    return keys


def apply_override(values: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.lr=3e-5)")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-5" as a string; accept plain float spellings for numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    parts = dotted.split(".")
    # Check the path against the schema so a typo gets a suggestion across sections.
    cls: Any = Config
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            if dataclasses.is_dataclass(cls):
                prefix = ".".join(parts[:i])
                valid = [k for k in _all_keys(Config) if k.count(".") == i and k.startswith(prefix)]
                close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else _suggest(part, list(hints))
                raise ConfigError(f"unknown config key {dotted!r}: {hint}")
            break  # inside a free-form mapping (e.g. model.extra.foo)
        cls = hints[part]
        origin = typing.get_origin(cls)
        if origin in (typing.Union, types.UnionType):
            dcs = [a for a in typing.get_args(cls) if dataclasses.is_dataclass(a)]
            cls = dcs[0] if dcs else cls
    out = dict(values)
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a config file (bare names resolve into ``configs/``), apply overrides, validate."""
    values = read_yaml(resolve_config_path(path))
    for override in overrides:
        values = apply_override(values, override)
    return config_from_dict(values)


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_atomic(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
