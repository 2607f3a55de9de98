"""The main job: ``python scripts/finetune.py --cfg pick_place.yaml``.

Collect demos if missing (when ``data.collect_if_missing``), build the datasets with the model's
tokenizer, load the pretrained VLA (or build a preset), fine-tune every parameter, evaluate the best
checkpoint in simulation and write the run directory (config, checkpoints, metrics, plots, report,
and ``summary.json``: parameter counts, train/eval wall time, peak memory, val loss, success rate).
With ``model.lora.r > 0`` LoRA adapters replace full-parameter training (vla_ft/models/lora.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ft.config import REPO_ROOT, Config, save_config
from vla_ft.data.lerobot import is_lerobot_path
from vla_ft.errors import ConfigError, DataError, EnvError
from vla_ft.eval.env_check import EnvProbe, eval_max_steps
from vla_ft.eval.env_match import check_envs, expected_from_data, fallback_instruction, instruction_warning
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.distributed import DistContext, micro_batch_size, setup_distributed
from vla_ft.train.loop import FitResult, fit
from vla_ft.train.memory import warn_if_out_of_memory
from vla_ft.train.preflight import Problems, check_env_names, check_output_dir
from vla_ft.train.step import resolve_precision

SUMMARY_FILE = "summary.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    fit: FitResult
    eval: dict | None  # final evaluation summary (success_rate, ci95, ...) or None when skipped
    wall_s: float


def config_problems(cfg: Config) -> list[ConfigError]:
    """Cross-section checks that need no data, done before anything loads (every one that fails)."""
    tc, found = cfg.train, []
    if tc.best_metric == "success_rate" and not tc.eval_every:
        found.append(
            "train.best_metric=success_rate needs periodic simulation evaluation: set train.eval_every > 0"
        )
    if tc.patience is not None and tc.best_metric == "val_loss" and not tc.val_every:
        found.append("train.patience with train.best_metric=val_loss needs train.val_every > 0")
    if cfg.model.lora.r and tc.unfreeze_steps:
        found.append(
            f"train.unfreeze_steps={tc.unfreeze_steps} with model.lora.r={cfg.model.lora.r}: LoRA trains "
            f"adapters on a frozen backbone, progressive unfreezing would unfreeze it; set train.unfreeze_steps=0"
        )
    if tc.parallel == "fsdp" and cfg.model.lora.r:
        found.append(
            f"model.lora.r={cfg.model.lora.r} with train.parallel=fsdp is not supported (LoRA checkpoints merge "
            f"a full copy of the policy): use train.parallel=ddp, or model.lora.r=0"
        )
    if cfg.data.collect_if_missing and Path(cfg.collect.output) != Path(cfg.data.paths[0]):
        found.append(
            f"data.collect_if_missing collects into collect.output={cfg.collect.output!r}, which is not "
            f"data.paths[0]={cfg.data.paths[0]!r}: make them the same file"
        )
    if _config_kind(cfg) == "cnn":  # the bc-cnn baseline: options it has no use for
        from vla_ft.models.bc_cnn import unsupported_options

        found += unsupported_options(cfg, fresh=cfg.model.pretrained is None)
    return [ConfigError(msg) for msg in found]


def _config_kind(cfg: Config) -> str | None:
    """The kind of model the config builds or loads (``vla_ft.models.loading.architecture_kind``)."""
    from vla_ft.models.loading import architecture_kind

    return architecture_kind(
        dataclasses.replace(cfg.model, pretrained=resolve_pretrained(cfg.model.pretrained))
    )


def check_config(cfg: Config) -> None:
    """:func:`config_problems`, raised (one problem as it is, several together)."""
    problems = Problems()
    for error in config_problems(cfg):
        problems.add(error)
    problems.raise_if_any()


def seed_everything(seed: int, deterministic: bool, threads: int | None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_run_dir(cfg: Config) -> Path:
    """``out_dir/run_name``; without a run name, a new ``<name>-<timestamp>`` directory, or with
    ``train.resume=auto`` the newest existing ``<name>-*`` run that has a checkpoint."""
    out = Path(cfg.train.out_dir)
    if cfg.train.run_name:
        return out / cfg.train.run_name
    if cfg.train.resume == "auto" and out.is_dir():
        runs = sorted((p for p in out.glob(f"{cfg.name}-*") if (p / "last").exists()), key=os.path.getmtime)
        if runs:
            return runs[-1]
    return out / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def ensure_data(cfg: Config) -> None:
    """Collect the configured demos when missing and allowed; else name the exact command."""
    from vla_ft.data.collect import warn_stale_env

    # a LeRobotDataset root (or hub id) is read as it is, never collected
    missing = [p for p in cfg.data.paths if not Path(p).is_file() and not is_lerobot_path(p)]
    warn_stale_env([p for p in cfg.data.paths if p not in missing])
    if not missing:
        return
    if cfg.data.collect_if_missing and missing == [cfg.data.paths[0]]:
        from vla_ft.data.collect import run_collect

        print(f"[vla-ft] {missing[0]} not found: collecting {cfg.collect.episodes} demos per task first")
        run_collect(cfg)
        return
    raise DataError(
        f"dataset file {missing[0]} not found. Collect it with: python scripts/collect_demos.py "
        f"--cfg <your config> collect.output={missing[0]}  (or set data.collect_if_missing=true)"
    )


def resolve_pretrained(spec: str | None) -> str | None:
    """A relative checkpoint path is tried against the working directory, then the repo root."""
    if spec is None:
        return None
    if not Path(spec).exists() and (REPO_ROOT / spec).exists():
        return str(REPO_ROOT / spec)
    return spec


def sim_evaluate(cfg: Config, run_dir: Path, policy, step: int, ckpt: Path | None = None, name=None):
    """Evaluate ``policy`` in simulation into ``<run>/eval/<name or step_N>``; returns the ``EvalResult``."""
    from vla_ft.eval import evaluate

    out = run_dir / "eval" / (name or f"step_{step:07d}")
    return evaluate(policy, cfg.env, cfg.eval, out_dir=out, ckpt=ckpt, step=step)


def eval_metrics(result) -> dict[str, float]:
    """The numbers the training loop logs and tracks from an ``EvalResult``."""
    low, high = result.ci95
    return {
        "success_rate": result.success_rate,
        "ci95_low": low,
        "ci95_high": high,
        "episodes": len(result.episodes),
    }


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (MiB) of a process since it started its program, or None if unknown.

    Linux: ``VmHWM`` from ``/proc/<pid>/status`` (the high-water mark of the process's own memory).
    Not ``getrusage().ru_maxrss``: that keeps the RSS the process had before ``exec``, i.e. a large
    parent's (a job started by scripts/compare.py would report the comparison process's memory).
    Elsewhere, for this process: ``ru_maxrss``.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        return None  # an exited process (zombie) has no memory lines
    except OSError:
        if pid != "self":
            return None
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process and, on CUDA, torch's peak allocated memory (MiB)."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": peak_rss_mb(), "cuda_peak_allocated_mb": cuda}


def write_summary(run_dir: Path, summary: dict) -> Path:
    """Write ``summary.json`` (what a finished run measured) atomically into the run directory."""
    out = run_dir / SUMMARY_FILE
    tmp = out.with_name(f".{SUMMARY_FILE}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out)
    return out


def run_finetune(cfg: Config) -> FinetuneResult:
    """Run the whole job (see module docstring). Returns the run directory and results.

    Under torchrun (``train.parallel=ddp|fsdp``) every rank runs this; rank 0 alone writes the
    config, logs, evaluates, plots and writes the summary (the other ranks return ``eval=None``).
    """
    t_start = time.perf_counter()
    ctx = setup_distributed(cfg.train.parallel, cfg.train.device)
    result = _run(cfg, ctx, t_start)  # on an error the process group is left to the exiting process
    ctx.close()
    return result


def _heatmap_count(policy: torch.nn.Module) -> int:
    """Keypoint heat maps per image of the policy's vision encoder (0: none, e.g. a VLM backbone)."""
    if not getattr(policy.backbone, "has_heatmaps", False):
        return 0
    return int(policy.backbone.vision.keypoints.heatmaps.out_channels)


@dataclass
class Prepared:
    """What the checks before training resolved: the model source, data and policy."""

    resume_ckpt: Path | None
    train_ds: Any
    val_ds: Any
    info: Any
    policy: torch.nn.Module


def check_source(model_cfg: Any) -> None:
    """``model.pretrained`` names a readable checkpoint (verified against its manifest), a hub id
    reachable now, or nothing; ``model.preset`` a known preset when nothing is loaded."""
    from vla_ft.models.language import hub_or_dir
    from vla_ft.models.loading import check_checkpoint
    from vla_ft.models.presets import get_preset

    spec = model_cfg.pretrained
    if spec is None:
        get_preset(model_cfg.preset)
    elif Path(spec).exists() or spec.startswith((".", "/")) or "/" not in spec:
        check_checkpoint(Path(spec))
    else:
        hub_or_dir(spec, "model.pretrained")


def prepare(cfg: Config, ctx: DistContext, run_dir: Path) -> Prepared:
    """Resolve and check everything the run names before the first step, reporting every problem
    at once (vla_ft/train/preflight.py); nothing is written into the run directory yet.

    When the run evaluates in simulation, rank 0 builds one instance of the env (every task) in a
    spawned process while the data and the model load, and compares it with them
    (vla_ft/eval/env_check.py)."""
    problems = Problems()
    probe = None
    if sim_evaluates(cfg):
        with problems.check() as names:
            if cfg.env.type != "gym":  # a gym id is imported and made by the env check itself
                check_env_names(cfg.env)  # cheap, and names the closest task; nothing is built
        if names.ok and ctx.is_main:
            probe = EnvProbe(cfg.env, eval_max_steps(cfg.env, cfg.eval))
    with probe or contextlib.nullcontext():
        ready, warnings = _check_all(cfg, ctx, run_dir, problems, probe)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return ready


def sim_evaluates(cfg: Config) -> bool:
    """Whether the run evaluates in simulation (a final evaluation, or periodic ones)."""
    return cfg.eval.episodes > 0 or bool(cfg.train.eval_every)


def _missing_data(cfg: Config) -> bool:
    return any(not Path(p).is_file() and not is_lerobot_path(p) for p in cfg.data.paths)


def _check_all(
    cfg: Config, ctx: DistContext, run_dir: Path, problems: Problems, probe: EnvProbe | None
) -> tuple[Prepared, list[str]]:
    """:func:`prepare`'s checks; returns what they resolved and the warnings to print."""
    from vla_ft.data.dataset import build_datasets
    from vla_ft.data.reader import scan_file
    from vla_ft.models import load_tokenizer, load_vla

    for error in config_problems(cfg):
        problems.add(error)
    with problems.check():
        micro_batch_size(cfg.train.batch_size, cfg.train.grad_accum, ctx.world_size)
    with problems.check() as out_dir:  # checked again below with the checkpoint's size
        check_output_dir(cfg.train.out_dir)
    resume_ckpt = model_cfg = tokenizer = info = policy = train_ds = val_ds = None
    with problems.check():
        resume_ckpt = ckpt_io.find_resume_checkpoint(cfg.train.resume, run_dir) if cfg.train.resume else None
        source = str(resume_ckpt) if resume_ckpt else resolve_pretrained(cfg.model.pretrained)
        model_cfg = dataclasses.replace(cfg.model, pretrained=source)
        check_source(model_cfg)
        tokenizer = load_tokenizer(model_cfg)
    data_ok = env_ok = True
    if ctx.is_main:  # collects the demos when missing and allowed (the other ranks wait)
        if probe is not None and _missing_data(cfg):  # no minutes of collecting for a broken env
            with problems.check() as built:
                probe.result()
            env_ok = built.ok
        with problems.check() as data:
            if env_ok:
                ensure_data(cfg)
        data_ok = data.ok and env_ok
    if not ctx.broadcast(data_ok):
        problems.raise_if_any()
        raise DataError("rank 0 could not prepare the data (see its error above)")
    scans = []
    for path in cfg.data.paths:
        with problems.check():
            scans.append(scan_file(path, cfg.data))
    if len(scans) == len(cfg.data.paths) and tokenizer is not None:
        with problems.check():
            train_ds, val_ds, info = build_datasets(cfg.data, tokenizer, cfg.seed, scans=scans)
    if info is not None:
        _label_problems(cfg, info, problems)
    if info is not None and model_cfg is not None:
        with problems.check():
            try:
                policy = load_vla(model_cfg, info)
            except ConfigError as exc:  # said already by config_problems (e.g. a bc-cnn option)?
                if str(exc) not in {str(e) for e in problems.errors}:
                    raise
        for error in _policy_problems(cfg, policy) if policy is not None else []:
            problems.add(error)
    if policy is not None and out_dir.ok:  # room for one checkpoint, now that its size is known
        with problems.check():
            need = ckpt_io.estimate_checkpoint_bytes(policy, bool(cfg.train.ema))
            check_output_dir(cfg.train.out_dir, need if ctx.is_main else None)
    warnings: list[str] = []
    if probe is not None:
        with problems.check() as env:
            warnings = _env_problems(cfg, probe, info, scans)
        env_ok = env.ok
    if not ctx.broadcast(env_ok):  # rank 0 alone checked the env
        problems.raise_if_any()
        raise EnvError("rank 0's environment check failed (see its error above)")
    problems.raise_if_any()
    return Prepared(resume_ckpt, train_ds, val_ds, info, policy), warnings


def _env_problems(cfg: Config, probe: EnvProbe, info: Any, scans: list) -> list[str]:
    """The env check's result against the data (when it loaded): raises the first mismatch, returns
    the warnings (an image size resized differently than at training, an unknown instruction)."""
    specs = probe.result()
    if info is None or not scans:  # the data failed its own checks: the env was built, that is all
        return []
    warnings = check_envs(specs, expected_from_data(info, scans[0]), cfg.env)
    instructions = info.task_instructions or {}
    for spec in specs:  # an env without instructions needs one from the data: fail now, not after training
        fallback_instruction(spec, cfg.env, instructions)
    note = instruction_warning(cfg.env, instructions)
    return warnings + ([note] if note else [])


def _policy_problems(cfg: Config, policy: torch.nn.Module) -> list[ConfigError]:
    """Loss terms and options the loaded policy cannot serve (known once it is built)."""
    if policy.arch.get("kind") == "cnn":  # bc-cnn: config_problems checked it when the kind was
        if _config_kind(cfg) == "cnn":  # known from the config; else (a hub checkpoint) now
            return []
        from vla_ft.models.bc_cnn import unsupported_options

        return [ConfigError(msg) for msg in unsupported_options(cfg, fresh=False)]
    heads = getattr(policy, "task_terms_supported", None)  # None: every term (VLAPolicy)
    extra = [t for t, w in cfg.loss.task_terms.items() if w > 0 and heads is not None and t not in heads]
    if extra:
        return [
            ConfigError(
                f"loss.task_terms {extra}: this model ({type(policy).__name__}) has no heads for them; "
                f"set loss.task_terms={{}} (its action loss trains alone)"
            )
        ]
    heatmaps = _heatmap_count(policy)
    if cfg.loss.task_terms.get("grounding", 0) > 0 and heatmaps < 2:
        return [
            ConfigError(
                f"loss.task_terms.grounding needs a backbone with at least 2 spatial-softmax keypoints "
                f"(heat map 0 = the named object, 1 = the destination); this model has {heatmaps}: use "
                f"the tiny preset or set model.extra.keypoints >= 2, or drop 'grounding' from "
                f"loss.task_terms"
            )
        ]
    return []


def _label_problems(cfg: Config, info: Any, problems: Problems) -> None:
    """Loss terms whose labels the data does not have."""
    if cfg.loss.task_terms.get("waypoint", 0) > 0 and info.waypoint_key is None:
        problems.add(
            ConfigError(
                f"loss.task_terms.waypoint needs an end-effector position in the data, but none of the "
                f"state keys {info.state_keys} is one (data.waypoint_key={cfg.data.waypoint_key!r}); set "
                f"data.waypoint_key, or drop 'waypoint' from loss.task_terms"
            )
        )
    if cfg.loss.task_terms.get("grounding", 0) > 0 and info.files_without_targets:
        problems.add(
            ConfigError(
                f"loss.task_terms.grounding needs the image positions of the instruction's objects "
                f"(data/demo_i/targets/<camera>, written by scripts/collect_demos.py), "
                f"but {', '.join(info.files_without_targets)} has none for cameras {info.image_keys}; "
                f"re-collect it (delete the file when data.collect_if_missing is on), or drop "
                f"'grounding' from loss.task_terms"
            )
        )


def _run(cfg: Config, ctx: DistContext, t_start: float) -> FinetuneResult:
    from vla_ft.data.augment import Augmenter
    from vla_ft.models import count_parameters, param_info
    from vla_ft.models.lora import apply_lora

    seed_everything(cfg.seed, cfg.train.deterministic, cfg.train.threads)
    device = ctx.device
    precision = resolve_precision(cfg.train.precision, device)
    run_dir = ctx.broadcast(resolve_run_dir(cfg))  # rank 0's (a timestamped name differs per rank)
    ready = prepare(cfg, ctx, run_dir)
    resume_ckpt, train_ds, val_ds, info, policy = (
        ready.resume_ckpt, ready.train_ds, ready.val_ds, ready.info, ready.policy
    )  # fmt: skip
    if resume_ckpt is None:
        policy.set_normalizer(info.normalizer)
    policy = apply_lora(policy, cfg.model.lora, resume=resume_ckpt)  # r=0 (full FT): unchanged
    trainable, total = count_parameters(policy)
    policy.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    policy.to(device)
    if ctx.is_main:
        save_config(cfg, run_dir)
        parallel = f" | {cfg.train.parallel} x {ctx.world_size}" if ctx.enabled else ""
        print(
            f"[vla-ft] run dir {run_dir} | device {device} ({precision}){parallel} | {info.num_train_demos} "
            f"train / {info.num_val_demos} val demos, {len(train_ds)} samples"
        )
        if device.type == "cuda":
            warn_if_out_of_memory(cfg, policy, info, ctx.world_size, device)

    resume = ckpt_io.load_training_state(resume_ckpt, ctx.rank) if resume_ckpt else None
    augment = Augmenter(cfg.data.augment) if cfg.data.augment.enabled else None
    evaluate_fn = None
    if cfg.train.eval_every:
        evaluate_fn = lambda policy, step: eval_metrics(sim_evaluate(cfg, run_dir, policy, step))  # noqa: E731
    gripper_zero = float(
        info.normalizer.normalize_action(np.zeros(info.action_dim, np.float32))[cfg.loss.gripper_dim]
    )
    loss_kwargs = {
        "action_dim": info.action_dim,
        "head": cfg.model.action_head,
        "n_bins": cfg.model.n_bins,
        "gripper_zero": gripper_zero,
    }
    if hasattr(policy, "bin_range"):
        loss_kwargs["bin_low"], loss_kwargs["bin_high"] = policy.bin_range
    t_fit = time.perf_counter()
    result = fit(
        cfg,
        policy,
        param_info(policy),
        train_ds,
        val_ds,
        run_dir,
        device,
        precision,
        augment=augment,
        evaluate_fn=evaluate_fn,
        resume=resume,
        sample_weights=train_ds.sample_weights(),
        loss_kwargs=loss_kwargs,
        ctx=ctx,
    )
    train_s = time.perf_counter() - t_fit
    if not ctx.is_main:  # rank 0 evaluates, plots and writes the summary
        return FinetuneResult(run_dir, result, None, time.perf_counter() - t_start)
    t_eval = time.perf_counter()
    final = None
    if cfg.eval.episodes > 0:
        from vla_ft.eval.run import summary
        from vla_ft.models import VLAPolicy

        best_dir = (run_dir / "best").resolve()
        best = VLAPolicy.from_pretrained(best_dir).to(device)
        evaluation = sim_evaluate(
            cfg, run_dir, best, result.step, ckpt=best_dir, name=f"final_{best_dir.name}"
        )
        final = eval_metrics(evaluation)
        final["successes"] = evaluation.report["overall"]["successes"]
        final["checkpoint"] = best_dir.name
        scored = ", ".join(evaluation.report["manifest"]["tasks"])  # env.tasks, else env.task / gym id
        print(f"[vla-ft] final evaluation of {best_dir.name} on {scored}:\n{summary(evaluation)}")
    eval_s = time.perf_counter() - t_eval
    if cfg.log.plots:
        from vla_ft.train.logging import write_plots

        write_plots(run_dir)
    wall_s = time.perf_counter() - t_start
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    summary = {
        "steps": result.step,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "parallel": {"mode": cfg.train.parallel, "world_size": ctx.world_size},
        "params": {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total},
        "lora": dataclasses.asdict(cfg.model.lora) if cfg.model.lora.r else None,
        "timing": {"train_s": train_s, "eval_s": eval_s, "total_s": wall_s},
        "memory": peak_memory_mb(device),
        "val_loss": {"final": vals[-1] if vals else None, "best": min(vals) if vals else None},
        "eval": final,
    }
    write_summary(run_dir, summary)
    if cfg.train.export_dir:
        from vla_ft.train.export import export_run

        export_run(cfg, run_dir, (run_dir / "best").resolve(), summary, cfg.train.export_dir)
    return FinetuneResult(run_dir, result, final, wall_s)
