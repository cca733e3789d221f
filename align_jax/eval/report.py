"""The pipeline's report: every stage's evaluation side by side, and each stage's training curves.

    write_report("runs/pipeline", {"base": {...}, "sft": {...}, "dpo": {...}},
                 curves={"sft": "runs/pipeline/sft", "dpo": "runs/pipeline/dpo"})

writes WORKDIR/report/:
  report.md           for readers: a table of the metrics (rows: readable name, ↑/↓ for which way is better,
                      the sample count n; columns: stages in the order given; each metric at its own precision,
                      the best stage in bold; "–" where a stage lacks a metric), a table of the per-check and
                      per-category breakdowns, per stage a few training summary lines and its curves, a chart per
                      metric, the run's timings and leftover counts, and the raw key of every name
  report.json         for machines: {"stages", "metrics": {stage: {raw key: value}} (every number, NaN as null),
                      "metric_info": {raw key: {name, direction, kind, count}}, "training"}
  curves/<stage>.png  what the stage optimises, chosen from the keys it logged (metric_names.curve_panels):
                      GRPO reward, KL, response length and loss; DPO margins, accuracy, loss; RM accuracy,
                      margin, loss; SFT loss and token accuracy; then a panel per other changing eval_* key
  metrics/<key>.png   one bar chart per metric across the stages that have it, its direction on the y axis (log
                      scale when the values span 100x or more, as perplexities do)

Names, directions, precision and count keys live in align_jax.eval.metric_names; a key it does not know keeps
its raw name and 4 significant digits, so nothing disappears. Counts (`pas/n_prompts`, `rm/pairs`) are not
metrics: they become the n= of their metric; timings (`eval_seconds`) go to the run section.

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
import textwrap
from collections.abc import Mapping, Sequence

from align_jax.eval.metric_names import Metric, as_json, curve_panels, describe, metric_order
from align_jax.metrics import read_metrics

REPORT_DIR = "report"
MISSING = "–"
LEGEND = "↑ higher is better, ↓ lower is better; **bold**: the best stage on that row; n: the samples measured."
BAR, BEST_BAR = "#4c72b0", "#2a9d5c"

Points = list[tuple[float, float]]


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def _axis_label(name: str, hint: str) -> str:
    return textwrap.fill(name, 32) + (f"\n({hint})" if hint else "")


# Training curves ----------------------------------------------------------------------------------------


def training_history(workdir: str) -> dict[str, Points]:
    """A stage workdir's logged curves: every numeric key of its metrics.jsonl -> (step, value) pairs;
    empty when it has no metrics.jsonl."""
    if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
        return {}
    history: dict[str, Points] = {}
    for row in read_metrics(workdir):
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                history.setdefault(k, []).append((step, float(v)))
    return history


def _varying(points: Sequence[tuple[float, float]]) -> bool:
    # Constant eval keys are counts (eval_tokens, eval_pairs): worth neither a line nor a plot.
    return len({v for _, v in points}) > 1


def _about(key: str, title: str, hint: str) -> str:
    # "loss — lower is better", not "loss — Loss, lower is better".
    same = title.lower() == key.removeprefix("eval_").replace("_", " ")
    return ", ".join(filter(None, ("" if same else title, hint)))


def training_summary(workdir: str, history: Mapping[str, Points]) -> list[str]:
    """A few markdown bullet lines on one stage's training run: the loss, what the stage optimises (the train
    series of its curve panels) and the eval keys, each first → last with what it is."""
    lines = []
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        bits = [f"{k} {summary[k]}" for k in ("init", "final_step", "n_params") if k in summary]
        if bits:
            lines.append("- " + ", ".join(bits))
    if not history:
        return [*lines, f"- no metrics.jsonl in `{workdir}`"]
    panels = curve_panels(history)
    about = {k: _about(k, p.title, p.hint) for p in panels for k, _ in p.series if p.title != k}
    note = {k: f" — {v}" for k, v in about.items() if v}
    if "loss" in history:
        (s0, l0), (s1, l1) = history["loss"][0], history["loss"][-1]
        n = len(history["loss"])
        lines.append(f"- loss {_fmt(l0)} → {_fmt(l1)} (steps {s0:g} → {s1:g}, {n} logged){note.get('loss', '')}")
    optimised = [k for p in panels for k, _ in p.series if k != "loss" and not k.startswith("eval_")]
    evals = [k for k in history if k.startswith("eval_")]
    for key in optimised + evals:
        points = history[key]
        (s0, v0), (s1, v1) = points[0], points[-1]
        if _varying(points):
            lines.append(f"- {key} {_fmt(v0)} → {_fmt(v1)} (steps {s0:g} → {s1:g}){note.get(key, '')}")
        elif key == "eval_loss" or key in about:  # a single value of a known curve (not a count)
            lines.append(f"- {key} {_fmt(v1)} (step {s1:g}){note.get(key, '')}")
    return lines


def plot_curves(history: Mapping[str, Points], title: str, path: str) -> None:
    """One panel per curve_panels entry (train lines, eval points), each with its y label and direction:
    logged keys live on scales too different (log-probs near -50, accuracies in [0, 1]) to share axes."""
    from matplotlib.figure import Figure

    panels = curve_panels(history)
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.4), layout="constrained")
    fig.suptitle(f"{title}: training curves", fontsize=11)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        for key, label in panel.series:
            style = dict(marker="o", markersize=3) if key.startswith("eval_") else {}
            ax.plot(*zip(*history[key], strict=True), label=label, linewidth=1.2, **style)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(_axis_label(panel.ylabel, panel.hint), fontsize=9)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no losses logged", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path, dpi=80)


def plot_metric(key: str, values: Mapping[str, float], path: str, n: str = "") -> None:
    """A bar per stage, labelled at the metric's precision; the best stage's bar in green when the metric has a
    direction. `n` ("n=200 prompts") goes in the title."""
    from matplotlib.figure import Figure

    metric = describe(key)
    width = max(3.6, 0.9 * len(values) + 2.0)
    fig = Figure(figsize=(width, 3.4), layout="constrained")
    ax = fig.subplots()
    finite = [v for v in values.values() if math.isfinite(v)]
    # Perplexities span 1 to the vocabulary size: on a linear axis every trained stage is a flat line.
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 100
    stages = list(values)
    heights = [v if math.isfinite(v) else (min(finite, default=1.0) if log else 0.0) for v in values.values()]
    best = _best(metric, values)
    bars = ax.bar(stages, heights, color=[BEST_BAR if s in best else BAR for s in stages])
    ax.bar_label(bars, labels=[metric.format(v) for v in values.values()], fontsize=8)
    if log:
        ax.set_yscale("log")
    title = metric.name + (f", {n}" if n else "") + (" (log scale)" if log else "")
    ax.set_title(textwrap.fill(title, int(width * 8)), fontsize=10)
    ax.set_ylabel(_axis_label(metric.name, metric.hint), fontsize=8)
    ax.margins(y=0.15)
    fig.savefig(path, dpi=80)


# The report ---------------------------------------------------------------------------------------------


def _best(metric: Metric, values: Mapping[str, float]) -> set[str]:
    """The stages with the best value as shown (ties at the printed precision share it); none when the
    metric has no direction, fewer than two stages have it, or all show the same."""
    if not metric.direction:
        return set()
    shown = {s: metric.format(v) for s, v in values.items() if math.isfinite(v)}
    if len(shown) < 2 or len(set(shown.values())) == 1:
        return set()
    best = max(shown, key=lambda s: metric.direction * values[s])
    return {s for s in shown if shown[s] == shown[best]}


def _counts(metric: Metric, values: Mapping[str, float], stage_metrics) -> tuple[str, dict[str, str]]:
    """The sample count as ("n=200 prompts" for the row label, {}) when every stage with the metric has the
    same, else ("", {stage: "n=..."}) for the cells; nothing when no stage logged it."""
    if not metric.count:
        return "", {}
    counts = {s: float(stage_metrics[s][metric.count]) for s in values if metric.count in stage_metrics[s]}
    shown = {s: f"n={describe(metric.count).format(v)}" for s, v in counts.items()}
    if len(counts) == len(values) and len(set(shown.values())) == 1:
        return f"{next(iter(shown.values()))} {metric.unit}".rstrip(), {}
    return "", shown


def markdown_table(
    stages: Sequence[str], keys: Sequence[str], stage_metrics: Mapping[str, Mapping[str, float]], first: str = "metric"
) -> str:
    """Rows: each key's readable name, ↑/↓ and n; cells at the metric's precision, the best in bold."""
    rows = [f"| {first} | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for key in keys:
        metric = describe(key)
        values = {s: float(stage_metrics[s][key]) for s in stages if key in stage_metrics.get(s, {})}
        label_n, cell_n = _counts(metric, values, stage_metrics)
        best = _best(metric, values)
        cells = []
        for s in stages:
            if s not in values:
                cells.append(MISSING)
                continue
            text = metric.format(values[s]) + (f" ({cell_n[s]})" if s in cell_n else "")
            cells.append(f"**{text}**" if s in best else text)
        label = metric.label + (f" ({label_n})" if label_n else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def split_keys(keys: Sequence[str]) -> dict[str, list[str]]:
    """The keys in report order as "metrics" (the main table, one chart each), "details" (breakdowns),
    "run" (timings, and counts that no metric here uses as its n) and "counts" (the used ones)."""
    out: dict[str, list[str]] = {"metrics": [], "details": [], "run": [], "counts": []}
    used = {describe(k).count for k in keys if describe(k).kind == "metric"}
    for key in metric_order(keys):
        m = describe(key)
        if m.kind == "metric":
            out["details" if m.detail else "metrics"].append(key)
        else:
            out["counts" if key in used else "run"].append(key)
    return out


def _key_reference(keys: Sequence[str]) -> list[str]:
    rows = [f"| {describe(k).name} | `{k}` |" for k in keys]
    return ["<details><summary>Raw keys (as in report.json)</summary>", "", "| name | key |", "|---|---|", *rows]


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
    all_keys = list(dict.fromkeys(k for m in stage_metrics.values() for k in m))
    keys = split_keys(all_keys)
    md = ["# Evaluation report", ""]
    if keys["metrics"] or keys["details"]:
        md += [LEGEND, ""]
    if keys["metrics"]:
        md += [markdown_table(stages, keys["metrics"], stage_metrics), ""]
    else:
        md += ["No evaluation metrics.", ""]
    if keys["details"]:
        md += ["### Constraint following by check and category", ""]
        md += [markdown_table(stages, keys["details"], stage_metrics, first="check or category"), ""]

    training: dict[str, list[str]] = {}
    if curves:
        md += ["## Training", ""]
    for stage, stage_dir in curves.items():
        history = training_history(stage_dir)
        training[stage] = training_summary(stage_dir, history)
        md += [f"### {stage}", "", *training[stage], ""]
        if history:
            png = f"curves/{_safe_name(stage)}.png"
            plot_curves(history, stage, os.path.join(tmp, png))
            md += [f"![{stage} training curves]({png})", ""]

    if keys["metrics"]:
        md += ["## Metrics across stages", ""]
    used: set[str] = set()
    for key in keys["metrics"]:
        values = {s: float(stage_metrics[s][key]) for s in stages if key in stage_metrics.get(s, {})}
        base = _safe_name(key)
        file_name, k = base, 1
        while file_name in used:  # "a/b" and "a_b" would share a file name
            k += 1
            file_name = f"{base}_{k}"
        used.add(file_name)
        png = f"metrics/{file_name}.png"
        plot_metric(key, values, os.path.join(tmp, png), _counts(describe(key), values, stage_metrics)[0])
        md += [f"![{describe(key).name}]({png})"]
    if keys["metrics"]:
        md += [""]

    if keys["run"]:
        md += ["## Run", "", markdown_table(stages, keys["run"], stage_metrics, first="measure"), ""]
    if all_keys:
        md += [*_key_reference(metric_order(all_keys)), "", "</details>"]

    with open(os.path.join(tmp, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")
    numbers = {s: {k: _json_number(v) for k, v in m.items()} for s, m in stage_metrics.items()}
    info = {k: as_json(describe(k)) for k in all_keys}
    with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
        report = {"stages": stages, "metrics": numbers, "metric_info": info, "training": training}
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # A directory cannot be renamed onto a non-empty one: move the old report aside, swap, then delete it.
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
