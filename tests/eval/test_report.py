"""The pipeline report: files, table contents, valid PNGs, atomic reruns."""

from __future__ import annotations

import json
import os

from align_jax.eval.report import MISSING, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stage_dir(tmp_path, name, losses, evals, summary=None):
    """A stage workdir with metrics.jsonl as the training loop writes it: train rows, then eval rows."""
    work = tmp_path / name
    work.mkdir()
    rows = [{"step": s, "loss": v, "learning_rate": 1e-3} for s, v in losses]
    rows += [{"step": s, **e} for s, e in evals]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (work / "summary.json").write_text(json.dumps(summary))
    return str(work)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_write_report_files_table_and_pngs(tmp_path):
    sft = stage_dir(
        tmp_path,
        "sft",
        [(10, 3.5), (20, 1.25), (30, 0.75)],
        [
            (20, {"eval_loss": 1.5, "eval_tokens": 640.0, "eval_accuracy": 0.5}),
            (30, {"eval_loss": 1.0, "eval_tokens": 640.0, "eval_accuracy": 0.625}),
        ],
        summary={"init": "scratch", "final_step": 30},
    )
    dpo = stage_dir(tmp_path, "dpo", [(5, 0.693), (10, 0.5)], [(10, {"eval_loss": 0.55, "eval_rewards/margins": 0.0})])
    metrics = {
        "base": {"constraints/prompt_acc": 0.0625, "ppl": 512.0},
        "sft": {"constraints/prompt_acc": 0.875, "ppl": 1.75, "nll": 0.5596},
        "dpo": {"constraints/prompt_acc": 0.9375, "winrate/vs_reference": 0.5},
    }
    out = write_report(str(tmp_path), metrics, {"sft": sft, "dpo": dpo})
    assert out == str(tmp_path / "report")
    assert sorted(os.listdir(tmp_path)) == ["dpo", "report", "sft"]  # no report.tmp / report.old left

    md = (tmp_path / "report" / "report.md").read_text()
    assert "| metric | base | sft | dpo |" in md
    assert "| constraints/prompt_acc | 0.0625 | 0.875 | 0.9375 |" in md
    assert f"| ppl | 512 | 1.75 | {MISSING} |" in md
    assert f"| nll | {MISSING} | 0.5596 | {MISSING} |" in md
    assert f"| winrate/vs_reference | {MISSING} | {MISSING} | 0.5 |" in md
    # Training summaries: the loss and the varying eval keys; constant counts (eval_tokens) left out.
    assert "- init scratch, final_step 30" in md
    assert "- loss 3.5 → 0.75 (steps 10 → 30, 3 logged)" in md
    assert "- eval_loss 1.5 → 1 (steps 20 → 30)" in md and "- eval_accuracy 0.5 → 0.625" in md
    assert "eval_tokens" not in md
    assert "- eval_loss 0.55 (step 10)" in md  # a single eval: its value

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["stages"] == ["base", "sft", "dpo"] and report["metrics"] == metrics
    pngs = [os.path.join(dp, f) for dp, _, fs in os.walk(out) for f in fs if f.endswith(".png")]
    assert sorted(os.path.relpath(p, out) for p in pngs) == sorted(
        [
            "curves/sft.png",
            "curves/dpo.png",
            "metrics/constraints_prompt_acc.png",
            "metrics/ppl.png",
            "metrics/nll.png",
            "metrics/winrate_vs_reference.png",
        ]
    )
    assert all(is_png(p) and os.path.getsize(p) > 1000 for p in pngs)
    for png in ("curves/sft.png", "metrics/ppl.png"):
        assert f"]({png})" in md


def test_rerun_replaces_the_report_and_missing_curves_are_said(tmp_path):
    write_report(str(tmp_path), {"sft": {"a": 1.0, "b": 2.0}}, {})
    assert os.path.isfile(tmp_path / "report" / "metrics" / "b.png")
    # A leftover from a run that died mid-write does not survive either.
    (tmp_path / "report.tmp").mkdir()
    (tmp_path / "report.tmp" / "junk").write_text("x")
    write_report(str(tmp_path), {"sft": {"a": 3.0}, "merge": {"a": float("nan")}}, {"sft": str(tmp_path / "nowhere")})
    assert sorted(os.listdir(tmp_path)) == ["report"]
    assert sorted(os.listdir(tmp_path / "report" / "metrics")) == ["a.png"]  # b's plot is gone
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| a | 3 | nan |" in md and "| b |" not in md
    assert "no metrics.jsonl" in md
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"] == {"sft": {"a": 3.0}, "merge": {"a": None}}  # valid JSON: NaN as null
