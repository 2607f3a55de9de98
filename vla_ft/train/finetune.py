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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ft.config import Config, save_config
from vla_ft.config_checks import config_kind, model_kind_problems, rule_problems
from vla_ft.data.collect import ensure_data, missing_data
from vla_ft.data.layout import gripper_index
from vla_ft.errors import ConfigError, DataError, EnvError
from vla_ft.eval.env_check import EnvProbe, eval_max_steps
from vla_ft.eval.env_match import check_envs, expected_from_data, fallback_instruction, instruction_warning
from vla_ft.models.bc_cnn import unsupported_options
from vla_ft.models.source import check_source, resolve_pretrained
from vla_ft.sim.env_types import env_type
from vla_ft.task_terms import task_term_problems
from vla_ft.tools.plan_memory import warn_if_out_of_memory
from vla_ft.train import checkpoint as ckpt_io
from vla_ft.train.distributed import DistContext, micro_batch_size, setup_distributed
from vla_ft.train.loop import FitResult, fit
from vla_ft.train.preflight import Problems, check_env_names, check_output_dir
from vla_ft.train.runtime import resolve_run_dir, run_summary, seed_everything, write_summary
from vla_ft.train.step import resolve_precision


@dataclass
class FinetuneResult:
    run_dir: Path
    fit: FitResult
    eval: dict | None  # final evaluation summary (success_rate, ci95, ...) or None when skipped
    wall_s: float


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


@dataclass
class Prepared:
    """What the checks before training resolved: the model source, data and policy."""

    resume_ckpt: Path | None
    train_ds: Any
    val_ds: Any
    info: Any
    policy: torch.nn.Module


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
            if not env_type(cfg.env).checked_by_build:  # gym: the env check imports and makes the id
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


def _check_all(
    cfg: Config, ctx: DistContext, run_dir: Path, problems: Problems, probe: EnvProbe | None
) -> tuple[Prepared, list[str]]:
    """:func:`prepare`'s checks; returns what they resolved and the warnings to print."""
    from vla_ft.data.dataset import build_datasets
    from vla_ft.data.reader import scan_file
    from vla_ft.models import load_tokenizer, load_vla

    kind_errors = model_kind_problems(cfg)  # building the policy would raise the first again
    for error in (*rule_problems(cfg), *kind_errors):
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
        if probe is not None and missing_data(cfg.data.paths):  # no minutes of collecting for a broken env
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
    for msg in task_term_problems(cfg, info=info) if info is not None else []:  # labels the data lacks
        problems.add(ConfigError(msg))
    if info is not None and model_cfg is not None and not kind_errors:
        with problems.check():
            policy = load_vla(model_cfg, info)
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
    if policy.arch.get("kind") == "cnn":  # bc-cnn: model_kind_problems checked it when the kind was
        if config_kind(cfg) == "cnn":  # known from the config; else (a hub checkpoint) now
            return []
        return [ConfigError(msg) for msg in unsupported_options(cfg, fresh=False)]
    return [ConfigError(msg) for msg in task_term_problems(cfg, policy=policy)]


def _setup_policy(
    cfg: Config, ctx: DistContext, ready: Prepared, run_dir: Path, precision: str
) -> tuple[torch.nn.Module, int, int]:
    """The prepared policy made ready to train: normalization stats (a fresh run), LoRA adapters,
    activation checkpointing, the device. Rank 0 writes the config and says what runs where.

    Returns:
        ``(policy, trainable parameters, all parameters)``.
    """
    from vla_ft.models import count_parameters
    from vla_ft.models.lora import apply_lora

    policy, info, device = ready.policy, ready.info, ctx.device
    if ready.resume_ckpt is None:
        policy.set_normalizer(info.normalizer)
    policy = apply_lora(policy, cfg.model.lora, resume=ready.resume_ckpt)  # r=0 (full FT): unchanged
    trainable, total = count_parameters(policy)
    policy.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    policy.to(device)
    if ctx.is_main:
        save_config(cfg, run_dir)
        parallel = f" | {cfg.train.parallel} x {ctx.world_size}" if ctx.enabled else ""
        print(
            f"[vla-ft] run dir {run_dir} | device {device} ({precision}){parallel} | {info.num_train_demos} "
            f"train / {info.num_val_demos} val demos, {len(ready.train_ds)} samples"
        )
        if device.type == "cuda":
            warn_if_out_of_memory(cfg, policy, info, ctx.world_size, device)
    return policy, trainable, total


def _periodic_eval(cfg: Config, run_dir: Path) -> Callable[[torch.nn.Module, int], dict] | None:
    """The loop's ``evaluate_fn`` (``train.eval_every``): metrics of a simulation evaluation."""
    if not cfg.train.eval_every:
        return None
    return lambda policy, step: eval_metrics(sim_evaluate(cfg, run_dir, policy, step))


def _loss_kwargs(cfg: Config, info: Any, policy: torch.nn.Module) -> dict[str, Any]:
    """What the action loss needs from the data and the policy (vla_ft/losses.py)."""
    zero = info.normalizer.normalize_action(np.zeros(info.action_dim, np.float32))
    gripper = gripper_index(info.action_dim, cfg.loss.gripper_dim)  # None: the loss names the option
    gripper_zero = None if gripper is None else float(zero[gripper])
    loss_kwargs = {
        "action_dim": info.action_dim,
        "head": cfg.model.action_head,
        "n_bins": cfg.model.n_bins,
        "gripper_zero": gripper_zero,
    }
    loss_kwargs["bin_low"], loss_kwargs["bin_high"] = policy.bin_range
    return loss_kwargs


def _final_eval(cfg: Config, run_dir: Path, step: int, device: torch.device) -> dict | None:
    """Evaluate the best checkpoint in simulation (``eval.episodes``; None when 0) and print it."""
    if cfg.eval.episodes <= 0:
        return None
    from vla_ft.eval.run import summary
    from vla_ft.models import VLAPolicy

    best_dir = (run_dir / "best").resolve()
    best = VLAPolicy.from_pretrained(best_dir).to(device)
    evaluation = sim_evaluate(cfg, run_dir, best, step, ckpt=best_dir, name=f"final_{best_dir.name}")
    final = eval_metrics(evaluation)
    final["successes"] = evaluation.report["overall"]["successes"]
    final["checkpoint"] = best_dir.name
    scored = ", ".join(evaluation.report["manifest"]["tasks"])  # env.tasks, else env.task / gym id
    print(f"[vla-ft] final evaluation of {best_dir.name} on {scored}:\n{summary(evaluation)}")
    return final


def _run(cfg: Config, ctx: DistContext, t_start: float) -> FinetuneResult:
    """:func:`run_finetune`'s stages, in order."""
    from vla_ft.data.augment import Augmenter
    from vla_ft.models import param_info

    seed_everything(cfg.seed, cfg.train.deterministic, cfg.train.threads)
    device = ctx.device
    precision = resolve_precision(cfg.train.precision, device)
    run_dir = ctx.broadcast(resolve_run_dir(cfg))  # rank 0's (a timestamped name differs per rank)
    ready = prepare(cfg, ctx, run_dir)
    resume_ckpt, train_ds, val_ds, info = ready.resume_ckpt, ready.train_ds, ready.val_ds, ready.info
    policy, trainable, total = _setup_policy(cfg, ctx, ready, run_dir, precision)
    resume = ckpt_io.load_training_state(resume_ckpt, ctx.rank) if resume_ckpt else None
    augment = Augmenter(cfg.data.augment) if cfg.data.augment.enabled else None
    evaluate_fn = _periodic_eval(cfg, run_dir)
    loss_kwargs = _loss_kwargs(cfg, info, policy)
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
    final = _final_eval(cfg, run_dir, result.step, device)
    eval_s = time.perf_counter() - t_eval
    if cfg.log.plots:
        from vla_ft.train.logging import write_plots

        write_plots(run_dir)
    wall_s = time.perf_counter() - t_start
    timing = {"train_s": train_s, "eval_s": eval_s, "total_s": wall_s}
    summary = run_summary(cfg, ctx, precision, result, (trainable, total), timing, final)
    write_summary(run_dir, summary)
    if cfg.train.export_dir:
        from vla_ft.train.export import export_run

        export_run(cfg, run_dir, (run_dir / "best").resolve(), summary, cfg.train.export_dir)
    return FinetuneResult(run_dir, result, final, wall_s)
