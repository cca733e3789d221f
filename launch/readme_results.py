"""Writes the README's results block from a recorded pipeline run, or checks that the README still matches
a run (CI does, after its own run of the README's main command, so the two cannot drift apart).

    python launch/readme_results.py --workdir runs/demo            # rewrite README.md's block
    python launch/readme_results.py --workdir runs/demo --check    # exit 1 naming every number that drifted

The block sits between `<!-- results:begin -->` and `<!-- results:end -->`: the headline metrics of every
stage (from WORKDIR/report/report.json), the reward model's accuracy and the merge's interpolation
(from WORKDIR/summary.json), and each stage's wall time on the machine that ran it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# (report key, row label, decimals). The label's {n} is the key's sample count where the report has one.
ROWS = (
    ("constraints/prompt_acc", "constraint following, prompt level ({n} demo prompts with programmatic checks)", 3),
    ("constraints/instruction_acc", "constraint following, instruction level ({n} checks)", 3),
    ("reward/mean", "mean reward of greedy responses under the pipeline's RM ({n} held-out prompts)", 2),
    ("winrate/vs_reference", "win rate against the SFT model under the RM", 3),
    ("ppl", "perplexity on held-out SFT chats ({n} tokens)", 2),
    ("pas/prompt_acc", "constraint following on PAS-augmented prompts", 3),
    ("ifeval/prompt_strict", "IFEval, prompt-level strict accuracy ({n} demo prompts in IFEval's format)", 3),
    ("ifeval/inst_strict", "IFEval, instruction-level strict accuracy ({n} instructions)", 3),
    ("ifeval/inst_loose", "IFEval, instruction-level loose accuracy", 3),
)
COUNTS = {
    "constraints/prompt_acc": "constraints/n_prompts",
    "constraints/instruction_acc": "constraints/n_instructions",
    "reward/mean": "reward/n",
    "ppl": "ppl/tokens",
    "ifeval/prompt_strict": "ifeval/n_prompts",
    "ifeval/inst_strict": "ifeval/n_instructions",
}
# How far a checked number may move before the README is stale: rates and rewards by an absolute amount
# (a few prompts flipping), perplexity relatively. Float rounding across machines stays well inside these.
ABS_TOL, REL_TOL = 0.03, 0.05


def _load(workdir: str) -> tuple[dict, dict]:
    with open(os.path.join(workdir, "report", "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return report, summary


def _fmt(value: float | None, decimals: int) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def results(workdir: str) -> tuple[str, dict[str, float]]:
    """(the markdown block, {name: value} of every number in it that a check compares)."""
    report, summary = _load(workdir)
    metrics: dict[str, dict[str, float | None]] = report["metrics"]
    stages = [s for s in metrics if any(metrics[s].get(k) is not None for k, _, _ in ROWS)]
    numbers: dict[str, float] = {}
    lines = ["| metric | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for key, label, decimals in ROWS:
        values = {s: metrics[s].get(key) for s in stages}
        if all(v is None for v in values.values()):
            continue
        n = next((metrics[s].get(COUNTS[key]) for s in stages if metrics[s].get(COUNTS.get(key, ""))), None)
        label = label.format(n=f"{int(n):,}" if n else "?") if "{n}" in label else label
        finite = [v for v in values.values() if v is not None and math.isfinite(v)]
        best = (min if key == "ppl" else max)(finite) if finite else None
        cells = []
        for s, v in values.items():
            text = _fmt(v, decimals)
            if v is not None and math.isfinite(v):
                numbers[f"{key} [{s}]"] = v
                text = f"**{text}**" if v == best and len(finite) > 1 else text
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = []
    rm = next((m["rm/accuracy"] for m in metrics.values() if m.get("rm/accuracy") is not None), None)
    if rm is not None:
        numbers["rm/accuracy"] = rm
        notes.append(f"The RM ranks {rm:.0%} of the held-out pairs right.")
    merge = summary.get("stage_summaries", {}).get("merge", {})
    t = merge.get("stats", {}).get("t", {}).get("mean")
    if t is not None:
        numbers["merge t"] = t
        notes.append(f"Model Stock interpolates with t = {t:.2f} on average over the tensors.")
    seconds = summary.get("seconds", {})
    if seconds:
        parts = ", ".join(
            f"{k} {v / 60:.1f} min" if v >= 90 else f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total"
        )
        notes.append(f"Wall time on a 2-core CPU: {seconds.get('total', 0) / 60:.1f} minutes in all ({parts}).")
    block = "\n".join([BEGIN, *lines, "", " ".join(notes), END])
    return block, numbers


def _numbers_in(block: str) -> dict[str, float]:
    """The compared numbers as the README states them (parsed back from its block)."""
    out: dict[str, float] = {}
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    header = next(line for line in block.splitlines() if line.startswith("| metric"))
    stages = [c.strip() for c in header.strip("|").split("|")[1:]]
    labels = {label.split(" (")[0]: key for key, label, _ in ROWS}
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        key = labels.get(cells[0].split(" (")[0])
        for s, cell in zip(stages, cells[1:], strict=True):
            if key and cell not in ("–", ""):
                out[f"{key} [{s}]"] = float(cell)
    m = re.search(r"The RM ranks (\d+)%", block)
    if m:
        out["rm/accuracy"] = int(m.group(1)) / 100
    m = re.search(r"t = ([\d.]+)", block)
    if m:
        out["merge t"] = float(m.group(1))
    return out


def stale(readme_block: str, run: dict[str, float]) -> list[str]:
    """Every number whose README value is off the run's by more than the tolerance, or missing."""
    stated = _numbers_in(readme_block)
    out = []
    for name, value in run.items():
        if name not in stated:
            out.append(f"{name}: {value:.4g} in the run, not in the README")
            continue
        tol = REL_TOL * abs(value) if name.startswith("ppl ") else ABS_TOL
        if abs(stated[name] - value) > tol:
            out.append(f"{name}: README {stated[name]:.4g}, run {value:.4g}")
    out += [f"{name}: in the README, not in the run" for name in stated if name not in run]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a finished run of configs/pipeline.py:tiny")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    a = p.parse_args(argv)
    block, numbers = results(a.workdir)
    with open(a.readme, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"error: {a.readme} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    if a.check:
        problems = stale(BEGIN + current + END, numbers)
        if problems:
            print("README results are stale (rerun launch/readme_results.py --workdir RUN):", file=sys.stderr)
            print("\n".join(f"  {p}" for p in problems), file=sys.stderr)
            return 1
        print(f"README results match the run in {a.workdir} ({len(numbers)} numbers)")
        return 0
    with open(a.readme + ".tmp", "w", encoding="utf-8") as f:
        f.write(head + block + tail)
    os.replace(a.readme + ".tmp", a.readme)
    print(f"README results written from {a.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
