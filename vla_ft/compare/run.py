"""Running the comparison: each row's job in its own subprocess, what it measured read back from the
files it wrote, and ``comparison.json`` / ``.md`` / ``.png`` (see the package docstring)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_ft.compare.report import render_markdown, render_plot
from vla_ft.compare.rows import DEFAULT_ROWS, Row, parse_rows, row_config, run_key, shared_config
from vla_ft.config import REPO_ROOT, Config, config_from_dict
from vla_ft.errors import ConfigError
from vla_ft.io import write_atomic
from vla_ft.provenance import machine_info


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


def run_child(cmd: list[str], log: Path, poll_s: float = 0.1) -> tuple[int, float, float | None]:
    """Run ``cmd`` with its output in ``log``.

    Returns:
        (exit code, wall seconds, peak RSS in MiB of the child process or None if never read). The
        peak is the child's ``VmHWM`` (see ``vla_ft.train.runtime.peak_rss_mb``), polled every
        ``poll_s`` while it runs; it is a high-water mark, so only growth in the last poll interval
        could be missed. ``getrusage(RUSAGE_CHILDREN)`` would not do: it is the running maximum over
        all rows, and it counts this (large) process's memory at the moment each child was spawned.
    """
    from vla_ft.train.runtime import peak_rss_mb

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


def _resolve_base(cfg: Config) -> Path | None:
    """The base checkpoint directory (``model.pretrained``), or None when the config has none."""
    from vla_ft.models.source import resolve_pretrained

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
        key = run_key(values, row.kind)
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
    from vla_ft.data.collect import ensure_data

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
