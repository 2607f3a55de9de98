"""The comparison's outputs: a markdown table and a PNG bar chart from ``comparison.json`` content.

Pure functions of the report dict (see :func:`vla_ft.compare.run.run_compare`); every file is
written to a temporary name and renamed (:func:`vla_ft.io.write_atomic`), so a crash never leaves a
half-written report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vla_ft.io import write_atomic

COLUMNS = (
    "row",
    "what",
    "train time",
    "eval time",
    "peak memory",
    "trainable params",
    "success (95% CI)",
    "final val loss",
)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_memory(row: dict[str, Any]) -> str:
    """CUDA: torch's peak allocated memory (and the process RSS); CPU: the child's peak RSS."""
    rss = f"{row['peak_rss_mb'] / 1024:.2f} GB RSS" if row.get("peak_rss_mb") is not None else "-"
    if row.get("cuda_peak_mb") is not None:
        return f"{row['cuda_peak_mb'] / 1024:.2f} GB CUDA ({rss})"
    return rss


def fmt_params(row: dict[str, Any]) -> str:
    if row.get("trainable") is None:
        return "-"
    if row["trainable"] == 0:
        return "0 (no training)"
    return f"{row['trainable']:,} ({row['trainable_pct']:.1f}%)"


def fmt_success(row: dict[str, Any]) -> str:
    if row.get("success_rate") is None:
        return "-"
    lo, hi = row["ci95"]
    return (
        f"{row['successes']}/{row['episodes']} = {100 * row['success_rate']:.1f}% "
        f"({100 * lo:.1f}-{100 * hi:.1f}%)"
    )


def table_cells(row: dict[str, Any]) -> list[str]:
    """One table line; a failed or n/a row says so instead of numbers."""
    name = f"`{row['name']}`"
    if row["status"] == "n/a":
        return [name, row["label"], *["n/a (no base)"] * 6]
    if row["status"] == "failed":
        error = str(row["error"]).replace("|", "/")
        return [name, row["label"], f"FAILED (exit {row['exit_code']}): {error}", *["-"] * 5]
    val = f"{row['val_loss']:.4f}" if row.get("val_loss") is not None else "-"
    what = row["label"] + (f" (same run as `{row['same_as']}`)" if row.get("same_as") else "")
    return [
        name,
        what,
        fmt_duration(row.get("train_s")),
        fmt_duration(row.get("eval_s")),
        fmt_memory(row),
        fmt_params(row),
        fmt_success(row),
        val,
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """``comparison.md``: what ran, on what, and the table."""
    b, m = report["budget"], report["machine"]
    devices = sorted({r["device"] for r in report["rows"] if r.get("device")})
    lines = [
        "# Full fine-tuning vs LoRA vs from scratch",
        "",
        f"- command: `{report['command'] or 'vla_ft.compare.run.run_compare'}`",
        f"- base: `{report['base'] or 'none (model.pretrained is null)'}`",
        f"- budget (every training row): {b['train.steps']} optimizer steps at batch {b['train.batch_size']}; "
        f"data {', '.join(f'`{p}`' for p in b['data.paths'])}",
        f"- evaluation (every row): {b['eval.episodes']} episodes, reset seeds {b['eval.seed']} .. "
        f"{b['eval.seed'] + b['eval.episodes'] - 1}",
        f"- machine: {m['platform']}, {m['cpus']} CPUs, {m['processor']}; training device "
        f"{', '.join(devices) or '-'}; {report['created']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in report["rows"]]
    notes = [f"- `{r['name']}`: {r['note']}" for r in report["rows"] if r.get("note") and r["status"] == "ok"]
    lines += [
        "",
        "Trainable params: parameters the run updated, and their share of all parameters of the "
        "trained model (LoRA: adapters + the new-task parts outside the backbone, out of base + "
        "adapters). Success: successes / episodes with the 95% Wilson interval. Peak memory: CUDA "
        "runs report torch's peak allocated memory; CPU runs the peak resident memory of the job's "
        "process (framework, data cache, model and optimizer state; the simulation workers of the "
        "evaluation run in their own processes and are not included).",
    ]
    if notes:
        lines += ["", "Notes:", *notes]
    failed = [r for r in report["rows"] if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed rows (full output in the log):"]
        lines += [f"- `{r['name']}`: {r['error']} (log: `{r['log']}`)" for r in failed]
    return "\n".join(lines) + "\n"


def rate_error_bars(rows: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Success rates (%) and the lengths below and above them of their 95% CIs, for error bars.

    ``rows`` are dicts with ``success_rate`` and ``ci95`` ([low, high], fractions); a row without a
    rate (failed, n/a) gives 0 for all three.
    """
    rate, low, high = [], [], []
    for r in rows:
        pct, below, above = 0.0, 0.0, 0.0
        if r.get("success_rate") is not None:
            pct = 100 * r["success_rate"]
            # max(0, .): a Wilson bound can sit on the rate up to rounding, and matplotlib refuses an
            # error bar of -1e-17 (found by the first full compare run: 0/100 rows)
            below = max(0.0, pct - 100 * r["ci95"][0])
            above = max(0.0, 100 * r["ci95"][1] - pct)
        rate.append(pct)
        low.append(below)
        high.append(above)
    return rate, low, high


def render_plot(report: dict[str, Any], path: Path) -> Path:
    """``comparison.png``: success rate with 95% CI error bars, and wall time (train + eval) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["name"] for r in rows]
    x = list(range(len(rows)))
    ok = [r["status"] == "ok" for r in rows]
    rate, low, high = rate_error_bars([r if o else {} for r, o in zip(rows, ok)])
    train = [(r.get("train_s") or 0.0) / 60 if o else 0.0 for r, o in zip(rows, ok)]
    evals = [(r.get("eval_s") or 0.0) / 60 if o else 0.0 for r, o in zip(rows, ok)]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(rows) + 4), 4.5), layout="constrained")
    ax1.bar(x, rate, yerr=[low, high], capsize=4, color="tab:blue")
    ax1.set_ylabel("success rate (%)")
    ax1.set_ylim(0, 105)
    ax1.set_title(f"success on {report['budget']['eval.episodes']} episodes (95% Wilson CI)")
    ax2.bar(x, train, color="tab:orange", label="train")
    ax2.bar(x, evals, bottom=train, color="tab:green", label="eval")
    ax2.set_ylim(0, max([1.05 * (t + e) for t, e in zip(train, evals)] + [0.1]))
    ax2.set_ylabel("wall time (min)")
    ax2.set_title("wall time")
    ax2.legend()
    rate_names = [f"{n}\n{v:.0f}%" if o else n for n, v, o in zip(names, rate, ok)]
    for ax, labels in ((ax1, rate_names), (ax2, names)):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right")
        for i, r in enumerate(rows):
            if not ok[i]:  # x in data units, y in axes units: independent of the axis range
                label = "n/a" if r["status"] == "n/a" else "failed"
                ax.text(
                    i, 0.02, label, ha="center", va="bottom", rotation=90, transform=ax.get_xaxis_transform()
                )
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
