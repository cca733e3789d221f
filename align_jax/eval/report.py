"""The pipeline's report: every stage's evaluation side by side, and each stage's training curves.

    write_report("runs/pipeline", {"base": {...}, "sft": {...}, "dpo": {...}},
                 curves={"sft": "runs/pipeline/sft", "dpo": "runs/pipeline/dpo"})

writes WORKDIR/report/:
  report.md           a table (rows: metrics; columns: stages in the order given; "–" where a stage lacks
                      a metric), then per stage a few training summary lines and its curves
  report.json         the same numbers: {"stages", "metrics": {stage: {name: value}}, "training"}
  curves/<stage>.png  train loss and eval_loss against step, then a panel per other eval_* key
  metrics/<name>.png  one bar chart per metric across the stages that have it (log scale when the
                      values span 100x or more, as perplexities do)

Stages with training curves but no evaluation (a reward model) get a training section, not a column.

The whole directory is built as WORKDIR/report.tmp and then swapped in, so a reader never sees a
half-written report and a rerun replaces the old one entirely. Plots use matplotlib's object API on the
Agg canvas (no pyplot), so nothing global changes in the caller's process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from align_jax.metrics import read_metrics

REPORT_DIR = "report"
MISSING = "–"
# At most this many eval keys get a panel of their own in a stage's curves; more would be unreadable.
MAX_EVAL_KEYS = 8


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def _metric_order(stage_metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    # First appearance across the stages: the suite's own order (headline numbers first) is kept.
    names: dict[str, None] = {}
    for metrics in stage_metrics.values():
        names.update(dict.fromkeys(metrics))
    return list(names)


# Training curves ----------------------------------------------------------------------------------------


def training_history(workdir: str) -> dict[str, Any]:
    """A stage workdir's logged curves: train (step, loss) pairs and, per eval_* key, (step, value)
    pairs; empty when it has no metrics.jsonl."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return {"train": [], "eval": {}}
    train, evals = [], {}
    for row in read_metrics(workdir):
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        if isinstance(row.get("loss"), int | float):
            train.append((step, float(row["loss"])))
        for k, v in row.items():
            if k.startswith("eval_") and isinstance(v, int | float):
                evals.setdefault(k, []).append((step, float(v)))
    return {"train": train, "eval": evals}


def _varying(points: Sequence[tuple[float, float]]) -> bool:
    # Constant eval keys are counts (eval_tokens, eval_pairs): worth neither a line nor a plot.
    return len({v for _, v in points}) > 1


def training_summary(workdir: str, history: Mapping[str, Any]) -> list[str]:
    """A few markdown bullet lines on one stage's training run."""
    lines = []
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        bits = [f"{k} {summary[k]}" for k in ("init", "final_step", "n_params") if k in summary]
        if bits:
            lines.append("- " + ", ".join(bits))
    train = history["train"]
    if not train and not history["eval"]:
        return [*lines, f"- no metrics.jsonl in `{workdir}`"]
    if train:
        (s0, l0), (s1, l1) = train[0], train[-1]
        lines.append(f"- loss {_fmt(l0)} → {_fmt(l1)} (steps {s0:g} → {s1:g}, {len(train)} logged)")
    for key, points in history["eval"].items():
        (s0, v0), (s1, v1) = points[0], points[-1]
        if _varying(points):
            lines.append(f"- {key} {_fmt(v0)} → {_fmt(v1)} (steps {s0:g} → {s1:g})")
        elif key == "eval_loss":
            lines.append(f"- {key} {_fmt(v1)} (step {s1:g})")
    return lines


def plot_curves(history: Mapping[str, Any], title: str, path: str) -> None:
    """The loss panel (train loss and eval_loss), then one panel per other varying eval key: eval keys
    live on scales too different (log-probs near -50, accuracies in [0, 1]) to share axes."""
    from matplotlib.figure import Figure

    extra = [(k, v) for k, v in history["eval"].items() if k != "eval_loss" and _varying(v)][:MAX_EVAL_KEYS]
    n = 1 + len(extra)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    ax = axes[0]
    if history["train"]:
        ax.plot(*zip(*history["train"], strict=True), label="loss", linewidth=1.2)
    if "eval_loss" in history["eval"]:
        ax.plot(*zip(*history["eval"]["eval_loss"], strict=True), "o-", label="eval_loss", linewidth=1.2)
    ax.set(xlabel="step", title=f"{title}: loss")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
    for ax, (key, points) in zip(axes[1:], extra, strict=False):
        ax.plot(*zip(*points, strict=True), "o-", color="#dd8452", markersize=3, linewidth=1.0)
        ax.set(xlabel="step", title=key)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path, dpi=80)


def plot_metric(name: str, values: Mapping[str, float], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(3.0, 0.9 * len(values) + 1.5), 3.0), layout="constrained")
    ax = fig.subplots()
    finite = [v for v in values.values() if math.isfinite(v)]
    # Perplexities span 1 to the vocabulary size: on a linear axis every trained stage is a flat line.
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 100
    stages = list(values)
    heights = [v if math.isfinite(v) else (min(finite, default=1.0) if log else 0.0) for v in values.values()]
    bars = ax.bar(stages, heights, color="#4c72b0")
    ax.bar_label(bars, labels=[_fmt(v) for v in values.values()], fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_title(name + (" (log scale)" if log else ""), fontsize=10)
    ax.margins(y=0.15)
    fig.savefig(path, dpi=80)


# The report ---------------------------------------------------------------------------------------------


def markdown_table(
    stages: Sequence[str], names: Sequence[str], stage_metrics: Mapping[str, Mapping[str, float]]
) -> str:
    rows = ["| metric | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for name in names:
        cells = [_fmt(float(stage_metrics[s][name])) if name in stage_metrics.get(s, {}) else MISSING for s in stages]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _json_number(v: float) -> float | None:
    return float(v) if math.isfinite(float(v)) else None


def write_report(workdir: str, stage_metrics: Mapping[str, Mapping[str, float]], curves: Mapping[str, str]) -> str:
    """Writes WORKDIR/report (see the module doc) from each stage's evaluation metrics (stage name ->
    flat metrics, in pipeline order) and training workdirs (stage name -> workdir with metrics.jsonl).
    Returns the report directory."""
    final = os.path.join(workdir, REPORT_DIR)
    tmp, old = final + ".tmp", final + ".old"
    for leftover in (tmp, old):  # from a run that died mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "curves"))
    os.makedirs(os.path.join(tmp, "metrics"))

    stages = list(stage_metrics)
    names = _metric_order(stage_metrics)
    md = ["# Evaluation report", ""]
    if names:
        md += [markdown_table(stages, names, stage_metrics), ""]
    else:
        md += ["No evaluation metrics.", ""]

    training: dict[str, list[str]] = {}
    if curves:
        md += ["## Training", ""]
    for stage, stage_dir in curves.items():
        history = training_history(stage_dir)
        training[stage] = training_summary(stage_dir, history)
        md += [f"### {stage}", "", *training[stage], ""]
        if history["train"] or history["eval"]:
            png = f"curves/{_safe_name(stage)}.png"
            plot_curves(history, stage, os.path.join(tmp, png))
            md += [f"![{stage} training curves]({png})", ""]

    if names:
        md += ["## Metrics across stages", ""]
    used: set[str] = set()
    for name in names:
        values = {s: float(stage_metrics[s][name]) for s in stages if name in stage_metrics.get(s, {})}
        base = _safe_name(name)
        file_name, k = base, 1
        while file_name in used:  # "a/b" and "a_b" would share a file name
            k += 1
            file_name = f"{base}_{k}"
        used.add(file_name)
        png = f"metrics/{file_name}.png"
        plot_metric(name, values, os.path.join(tmp, png))
        md += [f"![{name}]({png})"]

    with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")
    numbers = {s: {k: _json_number(v) for k, v in m.items()} for s, m in stage_metrics.items()}
    with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"stages": stages, "metrics": numbers, "training": training}, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # A directory cannot be renamed onto a non-empty one: move the old report aside, swap, then delete it.
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
