"""Full fine-tuning vs LoRA vs from scratch on one task: what ``scripts/compare.py`` runs.

The full-parameter fine-tuning guides compare, on one task, the pretrained model without tuning,
LoRA r=8 and r=16, and full fine-tuning (train time, memory, accuracy, trainable parameters).
This module reproduces that comparison on a robot task with success rate in simulation as the
metric. Rows (``--rows``; names are parsed, so other ranks and weights work too):

* ``base``: ``model.pretrained`` evaluated as is (zero-shot, no training; scripts/evaluate.py);
* ``lora_r<R>``: LoRA rank R on the base (``model.lora.r=R``, backbone frozen, heads trained);
* ``full``: full-parameter fine-tuning of the base;
* ``scratch``: the same architecture from random weights (``model.pretrained=null``);
* ``bc_cnn``: the plain CNN behaviour-cloning baseline (``model.preset=bc-cnn``, ~1.7M parameters, no
  transformer; vla_ft/models/bc_cnn.py) from scratch with its own recipe (:data:`BC_CNN_RECIPE`: lr
  1e-3 flat, batch 64, EMA 0.995, the L1 action loss alone) and the config's steps, data and
  augmentation: the reference point a VLA has to beat on this data;
* ``full_w_task_<W>``: full fine-tuning with task-loss weight ``loss.w_task=W`` (ablation);
* ``<row>_lr<M>``: any training row with its learning rate times M (``train.lr`` and with it every
  ``train.module_lr`` group, which are multipliers of it), e.g. ``lora_r16_lr10``: LoRA is commonly
  run at a higher rate than full fine-tuning, and a comparison at one shared rate says nothing
  about LoRA at its own.

Every row is the normal job (scripts/finetune.py or scripts/evaluate.py) in its own subprocess,
with its own config file written under ``<out>/configs/``: same data file (collected once, up
front), same step budget, same evaluation episodes and seeds. A crashed row is marked failed with
its error and the run exits non-zero after writing the report. Without a base
(``model.pretrained: null``) the rows that need one are reported as ``n/a (no base)``. A row whose
config equals an earlier row's (e.g. ``full_w_task_0.1`` when the config's ``loss.w_task`` is 0.1)
is not trained twice: it is reported as the same run.

Measured per row: wall time of training and of the final evaluation (from the run's
``summary.json`` / ``eval.json``), peak memory (CPU: the peak RSS of the job's process, see
:func:`run_child`; CUDA: ``torch.cuda.max_memory_allocated`` reported by the run), trainable parameters (count and share of
all parameters the run trained, adapters included), success with its 95% Wilson interval and the
last validation loss. Outputs: ``comparison.md``, ``comparison.json``, ``comparison.png``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_ft.compare_report import render_markdown, render_plot, write_atomic
from vla_ft.config import REPO_ROOT, Config, config_from_dict, config_to_dict
from vla_ft.errors import ConfigError

# LoRA at 10x the config's (full fine-tuning) learning rate: at 1x LoRA r=16 scored 0/100 on
# pick_place, at 3x 83/100, at 10x 95/100 against full fine-tuning's 94/100 (docs/results/
# compare_pick_place/); a shared rate would compare LoRA at a rate it is not run at.
DEFAULT_ROWS = (
    "base",
    "lora_r8_lr10",
    "lora_r16_lr10",
    "full",
    "scratch",
    "bc_cnn",
    "full_w_task_0",
    "full_w_task_0.1",
    "full_w_task_0.5",
)
ROW_NAMES_HELP = (
    "base, full, scratch, bc_cnn (the plain CNN behaviour-cloning baseline), lora_r<R> (e.g. lora_r8), "
    "full_w_task_<W> (e.g. full_w_task_0.5), and any training row with _lr<M> for its learning rate "
    "times M (e.g. lora_r16_lr10)"
)
# The bc_cnn row: the plain CNN behaviour-cloning baseline with the recipe of the reference CNN that
# reached 91% on pick_place (where the tiny VLA from scratch reached 7%): every architecture field of
# the config reset (the preset is its own), lr 1e-3 without per-module multipliers or layer decay,
# batch 64, EMA 0.995, the L1 action loss without task terms. Steps, schedule, warmup, data and
# augmentation stay the config's.
BC_CNN_RECIPE: dict[str, Any] = {
    "model.pretrained": None,
    "model.preset": "bc-cnn",
    "model.lora.r": 0,
    "model.vision": None,
    "model.vision_pretrained": None,
    "model.language": None,
    "model.vlm": None,
    "model.hidden_size": None,
    "model.num_layers": None,
    "model.num_heads": None,
    "model.extra": {},
    "model.gradient_checkpointing": False,
    "model.freeze": [],
    "model.action_head": "continuous",
    "loss.action": "l1",
    "loss.task_terms": {},
    "train.lr": 1e-3,
    "train.pretrain_lr": None,
    "train.lr_scale": None,
    "train.module_lr": {},
    "train.layer_decay": 1.0,
    "train.unfreeze_steps": 0,
    "train.batch_size": 64,
    "train.grad_accum": 1,
    "train.ema": 0.995,
}
# model fields that define the base's architecture (vla_ft.models.loading.ARCH_FIELDS) + preset knobs
_ARCH_KEYS = ("preset", "vision", "language", "vlm", "hidden_size", "num_layers", "num_heads", "extra")


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a job (``train`` or ``eval``) with config changes."""

    name: str
    label: str
    kind: str  # "train": scripts/finetune.py, "eval": scripts/evaluate.py on the base
    changes: dict[str, Any]  # dotted config key -> value, applied over the shared config
    needs_base: bool
    lr_scale: float = 1.0  # train.lr of the shared config times this (the ``_lr<M>`` suffix)
    own_arch: bool = False  # builds its own architecture (``bc_cnn``), not the base's

    @property
    def from_scratch(self) -> bool:
        """``scratch`` and its ``_lr<M>`` variants: the base's architecture, no weights."""
        return self.kind == "train" and not self.needs_base and not self.own_arch


@dataclass
class RowResult:
    """What one row measured (None where it does not apply); ``status`` is ok | failed | n/a."""

    name: str
    label: str
    status: str = "ok"
    same_as: str | None = None
    note: str | None = None
    error: str | None = None
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    config: str | None = None
    log: str | None = None
    run_dir: str | None = None
    steps: int | None = None
    train_s: float | None = None
    eval_s: float | None = None
    wall_s: float | None = None
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    device: str | None = None
    trainable: int | None = None
    total: int | None = None
    trainable_pct: float | None = None
    successes: int | None = None
    episodes: int | None = None
    success_rate: float | None = None
    ci95: list[float] | None = None
    val_loss: float | None = None


def parse_row(name: str) -> Row:
    """The row a name stands for.

    Raises:
        ConfigError: an unknown name (the message lists the valid forms).
    """
    if name == "base":
        return Row(name, "base, zero-shot (no training)", "eval", {}, True)
    m = re.fullmatch(r"(.+)_lr(\d+(?:\.\d+)?|\d*\.\d+)", name)
    if m:
        inner, scale = parse_row(m.group(1)), float(m.group(2))
        if inner.kind != "train" or inner.lr_scale != 1.0 or scale <= 0:
            why = (
                f"{inner.name!r} is not trained" if inner.kind != "train" else "give one positive multiplier"
            )
            raise ConfigError(f"--rows: row {name!r}: _lr{m.group(2)}: {why}; e.g. lora_r16_lr10")
        label = f"{inner.label}, learning rate x{scale:g}"
        return Row(name, label, inner.kind, inner.changes, inner.needs_base, scale, inner.own_arch)
    if name == "full":
        return Row(name, "full fine-tuning from the base", "train", {"model.lora.r": 0}, True)
    if name == "scratch":
        changes = {"model.lora.r": 0, "model.pretrained": None}
        return Row(name, "from scratch (same architecture, random init)", "train", changes, False)
    if name == "bc_cnn":
        label = "plain CNN behaviour cloning from scratch (bc-cnn: lr 1e-3, batch 64, EMA 0.995, L1 loss)"
        return Row(name, label, "train", dict(BC_CNN_RECIPE), False, own_arch=True)
    m = re.fullmatch(r"lora_r(\d+)", name)
    if m and int(m.group(1)) >= 1:
        r = int(m.group(1))
        return Row(name, f"LoRA r={r} on the base", "train", {"model.lora.r": r}, True)
    m = re.fullmatch(r"full_w_task_(\d+(?:\.\d+)?)", name)
    if m:
        w = float(m.group(1))
        changes = {"model.lora.r": 0, "loss.w_task": w}
        return Row(name, f"full fine-tuning, loss.w_task={w:g}", "train", changes, True)
    raise ConfigError(f"--rows: unknown row {name!r}; use names from: {ROW_NAMES_HELP}")


def parse_rows(names: list[str]) -> list[Row]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ConfigError(f"--rows: name at least one row ({ROW_NAMES_HELP})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--rows: {', '.join(dup)} given more than once; name each row once")
    return [parse_row(n) for n in names]


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    node = values
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _base_arch(base: Path) -> dict[str, Any]:
    """The base's architecture fields from its config.json (so ``scratch`` builds the same model)."""
    try:
        model = json.loads((base / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"model.pretrained={str(base)!r}: cannot read its config.json ({exc})") from None
    return {f"model.{k}": model[k] for k in _ARCH_KEYS if k in model}


def shared_config(cfg: Config, out: Path, steps: int | None, episodes: int | None) -> dict[str, Any]:
    """The config every row starts from: the user's, with the budget and paths made explicit."""
    values = config_to_dict(cfg)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps {steps}: use 1 or more optimizer steps")
        values["train"]["steps"] = steps
        if values["train"]["warmup_steps"] > steps:
            warm = steps // 10
            print(
                f"[compare] train.warmup_steps={values['train']['warmup_steps']} > --steps {steps}: using {warm}"
            )
            values["train"]["warmup_steps"] = warm
    if episodes is not None:
        if episodes < 1:
            raise ConfigError(f"--episodes {episodes}: use 1 or more evaluation episodes")
        values["eval"]["episodes"] = episodes
    data = [str(Path(p).resolve()) for p in values["data"]["paths"]]
    if Path(values["collect"]["output"]).resolve() == Path(data[0]):
        values["collect"]["output"] = data[0]
    values["data"]["paths"] = data
    values["train"].update(out_dir=str(out / "runs"), resume=None)
    values["log"]["progress"] = False  # child output goes to a log file
    return values


def row_config(shared: dict[str, Any], row: Row, out: Path, base: Path | None) -> dict[str, Any]:
    """A row's full config dict (validated): the shared config + the row's changes."""
    values = json.loads(json.dumps(shared))  # deep copy of plain data
    values["data"]["collect_if_missing"] = False  # collected once, up front
    values["train"]["run_name"] = row.name
    values["model"]["pretrained"] = str(base) if base is not None else None
    if row.from_scratch:
        for key, value in (_base_arch(base) if base is not None else {}).items():
            _set(values, key, value)
        values["model"]["vision_pretrained"] = None  # no component weights either
    if row.kind == "eval":
        values["eval"]["out_dir"] = str(out / "runs" / row.name / "eval")
    for key, value in row.changes.items():
        _set(values, key, value)
    if row.lr_scale != 1.0:  # the peak rate is pretrain_lr * lr_scale when those are set, else lr
        key = "pretrain_lr" if values["train"].get("lr_scale") is not None else "lr"
        values["train"][key] = values["train"][key] * row.lr_scale
    try:
        cfg = config_from_dict(values)
        if row.kind == "train":
            _check_bc_cnn(cfg)
    except ConfigError as exc:
        raise ConfigError(f"row {row.name}: {exc}") from None
    return values


def _check_bc_cnn(cfg: Config) -> None:
    """A row that builds or loads a bc-cnn policy (the ``bc_cnn`` row; any row on a bc-cnn base)
    uses no option it lacks: said before any row runs, not after the rows before it trained."""
    from vla_ft.models.bc_cnn import unsupported_options
    from vla_ft.models.loading import architecture_kind

    if architecture_kind(cfg.model) == "cnn":
        problems = unsupported_options(cfg, fresh=cfg.model.pretrained is None)
        if problems:
            raise ConfigError(problems[0])


def _identity(values: dict[str, Any], kind: str) -> str:
    """What makes two rows the same run: everything but the run name (and the eval output dir)."""
    v = json.loads(json.dumps(values))
    v["train"].pop("run_name")
    v["eval"].pop("out_dir")
    return kind + json.dumps(v, sort_keys=True)


def run_child(cmd: list[str], log: Path, poll_s: float = 0.1) -> tuple[int, float, float | None]:
    """Run ``cmd`` with its output in ``log``.

    Returns:
        (exit code, wall seconds, peak RSS in MiB of the child process or None if never read). The
        peak is the child's ``VmHWM`` (see ``vla_ft.train.finetune.peak_rss_mb``), polled every
        ``poll_s`` while it runs; it is a high-water mark, so only growth in the last poll interval
        could be missed. ``getrusage(RUSAGE_CHILDREN)`` would not do: it is the running maximum over
        all rows, and it counts this (large) process's memory at the moment each child was spawned.
    """
    from vla_ft.train.finetune import peak_rss_mb

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    peak = None
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    code = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    now = peak_rss_mb(proc.pid)
                    if now is not None:
                        peak = max(peak or 0.0, now)
        except BaseException:  # Ctrl-C or an error here: do not leave the job running
            proc.kill()
            proc.wait()
            raise
    return code, time.perf_counter() - start, peak


def error_line(log: Path) -> str:
    """The child's one-line error (``error: ...`` from the CLI) or the last line of its traceback."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1][len("error:") :].strip()
    return lines[-1] if lines else "no output"


def _fill_from_eval(res: RowResult, report: dict[str, Any]) -> None:
    o = report["overall"]
    res.successes, res.episodes, res.success_rate = o["successes"], o["episodes"], o["success_rate"]
    res.ci95 = list(o["ci95"])


def _collect_results(res: RowResult, row: Row, run_dir: Path) -> None:
    """Fill ``res`` from the files the child wrote (summary.json, eval.json)."""
    if row.kind == "eval":
        report = json.loads((run_dir / "eval" / "eval.json").read_text())
        _fill_from_eval(res, report)
        res.eval_s = report["timing"]["wall_s"]
        res.trainable, res.trainable_pct = 0, 0.0
        return
    summary = json.loads((run_dir / "summary.json").read_text())
    p, t, m = summary["params"], summary["timing"], summary["memory"]
    res.trainable, res.total, res.trainable_pct = p["trainable"], p["total"], p["trainable_pct"]
    res.train_s, res.eval_s, res.steps = t["train_s"], t["eval_s"], summary["steps"]
    res.cuda_peak_mb, res.device = m["cuda_peak_allocated_mb"], summary["device"]
    if m["peak_rss_mb"] is not None:  # the run's own reading at its end: exact, no poll interval
        res.peak_rss_mb = max(res.peak_rss_mb or 0.0, m["peak_rss_mb"])
    res.val_loss = summary["val_loss"]["final"]
    ckpt = summary["eval"]["checkpoint"]
    _fill_from_eval(res, json.loads((run_dir / "eval" / f"final_{ckpt}" / "eval.json").read_text()))


def row_command(row: Row, cfg_file: Path, base: Path | None) -> list[str]:
    """The normal job for a row: scripts/finetune.py (train) or scripts/evaluate.py on the base (eval)."""
    script = "finetune.py" if row.kind == "train" else "evaluate.py"
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / script), "--cfg", str(cfg_file)]
    return cmd + ["--ckpt", str(base)] if row.kind == "eval" else cmd


def run_row(row: Row, cfg_file: Path, out: Path, base: Path | None) -> RowResult:
    """Run one row's job in a subprocess and read what it measured; a crash gives status failed."""
    cmd = row_command(row, cfg_file, base)
    run_dir = out / "runs" / row.name
    log = out / "logs" / f"{row.name}.log"
    res = RowResult(
        row.name, row.label, command=cmd, config=str(cfg_file), log=str(log), run_dir=str(run_dir)
    )
    code, res.wall_s, res.peak_rss_mb = run_child(cmd, log)
    res.exit_code = code
    if code != 0:
        res.status, res.error = "failed", error_line(log)
        return res
    try:
        _collect_results(res, row, run_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        res.status = "failed"
        res.error = f"the run exited 0 but its results are unreadable ({type(exc).__name__}: {exc})"
    return res


def _fmt_result(res: RowResult) -> str:
    if res.status == "failed":
        return f"FAILED (exit {res.exit_code}): {res.error}  (log: {res.log})"
    lo, hi = res.ci95
    return (
        f"done in {res.wall_s:.0f} s: success {res.successes}/{res.episodes} = {100 * res.success_rate:.1f}% "
        f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%), trainable {res.trainable:,}"
    )


def display_command(cmd: list[str]) -> str:
    """A command as a user would type it (``python scripts/x.py ...``)."""
    return shlex.join(["python", os.path.relpath(cmd[1], os.getcwd()), *cmd[2:]])


def _check_scratch_arch(results: list[RowResult]) -> None:
    """Note on ``scratch`` when its parameter count differs from full fine-tuning's (not the same model)."""
    by_name = {r.name: r for r in results if r.status == "ok"}
    scratch, full = by_name.get("scratch"), by_name.get("full")
    if scratch and full and scratch.total != full.total:
        note = f"architecture differs from the base's: {scratch.total:,} vs {full.total:,} parameters (full)"
        scratch.note = f"{scratch.note}; {note}" if scratch.note else note


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


def _resolve_base(cfg: Config) -> Path | None:
    """The base checkpoint directory (``model.pretrained``), or None when the config has none."""
    from vla_ft.train.finetune import resolve_pretrained

    spec = resolve_pretrained(cfg.model.pretrained)
    if spec is None:
        return None
    base = Path(spec).resolve()
    if not (base / "config.json").is_file():
        raise ConfigError(
            f"model.pretrained={cfg.model.pretrained!r} is not a local checkpoint directory; the "
            f"comparison evaluates the base as is and rebuilds its architecture: give its directory"
        )
    return base


def _run_rows(
    plans: list[tuple[Row, dict[str, Any] | None]], out: Path, base: Path | None
) -> list[RowResult]:
    """Run the planned rows one after the other (n/a rows and repeats of a config are not run)."""
    results: list[RowResult] = []
    seen: dict[str, str] = {}
    for i, (row, values) in enumerate(plans, 1):
        head = f"[compare] {i}/{len(plans)} {row.name}: {row.label}"
        if values is None:
            results.append(RowResult(row.name, row.label, status="n/a", note="n/a (no base)"))
            print(f"{head}: n/a (no base: model.pretrained is null)", flush=True)
            continue
        key = _identity(values, row.kind)
        if key in seen:
            first = next(r for r in results if r.name == seen[key])
            results.append(
                RowResult(**{**asdict(first), "name": row.name, "label": row.label, "same_as": first.name})
            )
            print(f"{head}: same config as {first.name}, reported from that run")
            continue
        seen[key] = row.name
        cfg_file = write_atomic(out / "configs" / f"{row.name}.yaml", yaml.safe_dump(values, sort_keys=False))
        print(f"{head}\n[compare]   {display_command(row_command(row, cfg_file, base))}", flush=True)
        res = run_row(row, cfg_file, out, base)
        component = values["model"]["language"] or values["model"]["vlm"]
        if row.from_scratch and isinstance(component, str):
            res.note = f"the language model comes from {component!r} (pretrained weights), not random init"
        results.append(res)
        print(f"[compare]   {_fmt_result(res)}", flush=True)
    _check_scratch_arch(results)
    return results


def build_report(
    results: list[RowResult], shared: dict[str, Any], base: Path | None, argv: list[str] | None
) -> dict[str, Any]:
    """The ``comparison.json`` content."""
    paths = shared["data"]["paths"]
    return {
        "command": shlex.join(argv) if argv else None,
        "config": shared["name"],
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "base": str(base) if base is not None else None,
        "budget": {
            "train.steps": shared["train"]["steps"],
            "train.batch_size": shared["train"]["batch_size"],
            "eval.episodes": shared["eval"]["episodes"],
            "eval.seed": shared["eval"]["seed"],
            "data.paths": paths,
            "data.bytes": [Path(p).stat().st_size if Path(p).is_file() else None for p in paths],
        },
        "rows": [asdict(r) for r in results],
        "failed": [r.name for r in results if r.status == "failed" and not r.same_as],
    }


def run_compare(
    cfg: Config,
    out: str | Path | None = None,
    rows: list[str] | None = None,
    steps: int | None = None,
    episodes: int | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run the comparison (see the module docstring); returns the exit status (1: a row failed).

    Args:
        cfg: the loaded config (YAML + overrides) every row starts from.
        out: output directory (default ``<train.out_dir>/compare-<name>-<time>``); must be new or empty.
        rows: row names (default :data:`DEFAULT_ROWS`).
        steps: ``train.steps`` for every training row (None: the config's).
        episodes: ``eval.episodes`` for every row (None: the config's).
        argv: the command line, recorded in the report.

    Raises:
        ConfigError: bad rows, budget, base or out dir, or a row config that does not validate
            (all before anything runs).
    """
    from vla_ft.train.finetune import ensure_data

    row_list = parse_rows(list(rows or DEFAULT_ROWS))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out or Path(cfg.train.out_dir) / f"compare-{cfg.name}-{stamp}").resolve()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: give a new directory (rows would mix with old runs)")
    base = _resolve_base(cfg)
    shared = shared_config(cfg, out, steps, episodes)
    if shared["eval"]["episodes"] < 1:
        raise ConfigError("eval.episodes=0: the comparison scores success rates; use 1 or more episodes")
    plans = [
        (row, None if row.needs_base and base is None else row_config(shared, row, out, base))
        for row in row_list
    ]
    if any(values is not None for _, values in plans):
        ensure_data(config_from_dict(shared))  # collect once (if missing and allowed), before any row
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    results = _run_rows(plans, out, base)

    report = build_report(results, shared, base, argv)
    write_atomic(out / "comparison.json", json.dumps(report, indent=1))
    md = write_atomic(out / "comparison.md", render_markdown(report)).read_text()
    render_plot(report, out / "comparison.png")
    print(md)
    print(f"[compare] wrote {out / 'comparison.md'}, comparison.json and comparison.png")
    if report["failed"]:
        print(
            f"[compare] {len(report['failed'])} row(s) failed: {', '.join(report['failed'])}", file=sys.stderr
        )
        return 1
    return 0
