"""The pipeline report: files, table contents, valid PNGs, atomic reruns."""

from __future__ import annotations

import json
import os

from align_jax.eval.metric_names import HIGHER, LOWER, NEITHER, curve_panels, describe, metric_order, stage_kind
from align_jax.eval.report import MISSING, markdown_table, write_report

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
    # Readable names with their direction, each metric at its own precision, the best stage in bold.
    assert "| Constraint following, prompt level ↑ | 0.062 | 0.875 | **0.938** |" in md
    assert f"| Perplexity on held-out SFT chats ↓ | 512.00 | **1.75** | {MISSING} |" in md
    assert f"| NLL per token on held-out SFT chats ↓ | {MISSING} | 0.560 | {MISSING} |" in md
    assert f"| Win rate vs the reference model (RM) ↑ | {MISSING} | {MISSING} | 0.500 |" in md
    assert "| Constraint following, prompt level ↑ | `constraints/prompt_acc` |" not in md  # the key list:
    assert "| Constraint following, prompt level | `constraints/prompt_acc` |" in md  # name -> raw key
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


# Readable for its readers: names, directions, counts, precision, non-metrics apart --------------------------

PIPELINE_METRICS = {
    "base": {
        "constraints/prompt_acc": 0.06,
        "constraints/instruction_acc": 0.28,
        "constraints/n_prompts": 200.0,
        "constraints/n_instructions": 412.0,
        "constraints/check/word_count_max": 0.5,
        "ppl": 496.213,
        "ppl/tokens": 6687.0,
        "reward/mean": -2.3912,
        "reward/n": 96.0,
        "pas/prompt_acc": 0.04,
        "pas/n_prompts": 200.0,
        "eval_seconds": 12.34,
    },
    "sft": {
        "constraints/prompt_acc": 0.875,
        "constraints/instruction_acc": 0.898,
        "constraints/n_prompts": 200.0,
        "constraints/n_instructions": 412.0,
        "constraints/check/word_count_max": 0.9,
        "ppl": 3.987,
        "ppl/tokens": 6687.0,
        "reward/mean": 0.78,
        "reward/n": 96.0,
        "pas/prompt_acc": 0.86,
        "pas/n_prompts": 200.0,
        "eval_seconds": 8.0,
        "my/new_metric": 0.123456,
    },
    "rm": {"rm/accuracy": 0.8, "rm/pairs": 64.0, "eval_seconds": 1.5},
    "grpo": {
        "constraints/prompt_acc": 0.915,
        "constraints/n_prompts": 100.0,  # fewer prompts than the others: n goes in each cell
        "winrate/vs_reference": 0.69,
        "reward/mean": 1.17,
        "reward/n": 96.0,
        "ppl": 6.03,
        "ppl/tokens": 6687.0,
    },
}


def main_table(md):
    """The lines of the report's first table (the metrics)."""
    lines = md.split("| metric |", 1)[1].split("\n\n", 1)[0].splitlines()
    return ["| metric |" + lines[0], *lines[1:]]


def test_table_rows_are_readable_with_direction_count_precision_and_best(tmp_path):
    write_report(str(tmp_path), PIPELINE_METRICS, {})
    md = (tmp_path / "report" / "report.md").read_text()
    table = main_table(md)
    assert table[0] == "| metric | base | sft | rm | grpo |"
    assert "↑ higher is better, ↓ lower is better" in md  # the legend of the arrows and the bold
    expected = [
        f"| Constraint following, prompt level ↑ | 0.060 (n=200) | 0.875 (n=200) | {MISSING} | **0.915 (n=100)** |",
        f"| Constraint following, instruction level ↑ (n=412 checks) | 0.280 | **0.898** | {MISSING} | {MISSING} |",
        f"| Mean RM reward of greedy responses ↑ (n=96 prompts) | -2.39 | 0.78 | {MISSING} | **1.17** |",
        f"| Win rate vs the reference model (RM) ↑ (n=96 prompts) | {MISSING} | {MISSING} | {MISSING} | 0.690 |",
        f"| Perplexity on held-out SFT chats ↓ (n=6,687 tokens) | 496.21 | **3.99** | {MISSING} | 6.03 |",
        "| Constraint following with PAS prompts, prompt level ↑ (n=200 prompts) "
        f"| 0.040 | **0.860** | {MISSING} | {MISSING} |",
        f"| Reward model pair accuracy (held-out) ↑ (n=64 pairs) | {MISSING} | {MISSING} | 0.800 | {MISSING} |",
        f"| my/new_metric | {MISSING} | 0.1235 | {MISSING} | {MISSING} |",  # unknown: raw key, 4 digits
    ]
    assert table[2:] == expected
    # Non-metrics are not rows: counts became the n= above, the timing is in the run section.
    for key in ("eval_seconds", "n_prompts", "rm/pairs", "ppl/tokens", "reward/n", "Evaluation time"):
        assert key not in "\n".join(table), key
    run = md.split("## Run", 1)[1]
    assert f"| Evaluation time (s) | 12.3 | 8.0 | 1.5 | {MISSING} |" in run
    # Breakdowns have their own table, also with direction and the best in bold.
    assert f"| Check “word_count_max” pass rate ↑ | 0.500 | **0.900** | {MISSING} | {MISSING} |" in md
    # Charts for the metrics only: no chart of a count, a timing or a breakdown.
    charts = sorted(os.listdir(tmp_path / "report" / "metrics"))
    assert "eval_seconds.png" not in charts and "rm_pairs.png" not in charts and "pas_n_prompts.png" not in charts
    assert "constraints_check_word_count_max.png" not in charts and "my_new_metric.png" in charts
    assert len(charts) == len(expected)

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"] == PIPELINE_METRICS  # every raw number under its raw key
    info = report["metric_info"]
    assert info["constraints/prompt_acc"] == {
        "name": "Constraint following, prompt level",
        "direction": "higher",
        "kind": "metric",
        "count": "constraints/n_prompts",
    }
    assert info["ppl"]["direction"] == "lower"
    assert info["eval_seconds"]["kind"] == "timing" and info["rm/pairs"]["kind"] == "count"
    assert info["my/new_metric"] == {"name": "my/new_metric", "direction": None, "kind": "metric", "count": None}


def test_best_is_bold_only_where_it_means_something(tmp_path):
    stages = ["a", "b", "c"]
    metrics = {
        "a": {"ppl": 2.0, "rm/accuracy": 0.5, "reward/std": 1.0, "token_acc": 0.8751},
        "b": {"ppl": 2.0, "rm/accuracy": 0.5, "reward/std": 2.0, "token_acc": 0.8749},
        "c": {"ppl": 3.0, "rm/accuracy": float("nan"), "reward/std": 3.0, "token_acc": 0.5},
    }
    md = markdown_table(stages, ["ppl", "rm/accuracy", "reward/std", "token_acc"], metrics)
    assert "| Perplexity on held-out SFT chats ↓ | **2.00** | **2.00** | 3.00 |" in md  # a tie shares the bold
    assert "| Reward model pair accuracy (held-out) ↑ | 0.500 | 0.500 | nan |" in md  # all equal: no best
    assert "| Std of RM rewards of greedy responses | 1.00 | 2.00 | 3.00 |" in md  # no direction: no best
    assert "| Next-token accuracy on held-out SFT chats ↑ | **0.875** | **0.875** | 0.500 |" in md  # tie as shown


def test_describe_names_known_patterned_and_unknown_keys():
    ppl = describe("ppl")
    assert (ppl.name, ppl.direction, ppl.hint, ppl.format(3.98765)) == (
        "Perplexity on held-out SFT chats",
        LOWER,
        "lower is better",
        "3.99",
    )
    assert describe("constraints/prompt_acc").format(0.875) == "0.875"
    assert describe("reward/mean").format(-2.3912) == "-2.39"
    assert describe("constraints/category/format").name == "Category “format”, prompt level"
    assert describe("constraints/check/json").direction == HIGHER and describe("constraints/check/json").detail
    assert describe("rm/pairs").kind == "count" and describe("rm/pairs").format(1234.0) == "1,234"
    assert describe("other/n_rows").kind == "count" and describe("time/gen_seconds").kind == "timing"
    unknown = describe("x/y")
    assert (unknown.name, unknown.direction, unknown.kind, unknown.format(1 / 3)) == (
        "x/y",
        NEITHER,
        "metric",
        "0.3333",
    )
    # Registry order (headline numbers first, a breakdown after its parent), then unknown keys as given.
    keys = ["z", "ppl", "constraints/check/json", "constraints/instruction_acc", "constraints/prompt_acc", "a"]
    assert metric_order(keys) == [
        "constraints/prompt_acc",
        "constraints/instruction_acc",
        "constraints/check/json",
        "ppl",
        "z",
        "a",
    ]


# Training curves: what each stage optimises --------------------------------------------------------------


def history_of(*keys, steps=(1, 2, 3)):
    return {k: [(s, float(s * (i + 1))) for s in steps] for i, k in enumerate(keys)}


def panel_keys(panels):
    return [[k for k, _ in p.series] for p in panels]


def test_curve_panels_per_stage_kind():
    grpo = history_of(
        "loss", "reward/mean", "reward/std", "reward/checks", "kl", "response_length", "entropy", "eval_reward"
    )
    panels = curve_panels(grpo)
    assert stage_kind(grpo) == "rl"
    assert [p.title for p in panels] == [
        "Reward (mean)",
        "Reward components",
        "KL to the reference",
        "Response length",
        "Policy loss (surrogate)",
    ]
    assert panel_keys(panels) == [
        ["reward/mean", "eval_reward"],
        ["reward/checks"],
        ["kl"],
        ["response_length"],
        ["loss"],
    ]
    assert [p.direction for p in panels] == [HIGHER, HIGHER, NEITHER, NEITHER, NEITHER]  # GRPO's loss may rise

    dpo = history_of("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "nll")
    dpo.update(history_of("eval_loss", "eval_rewards/margins", "eval_pairs", steps=(3,)))
    panels = curve_panels(dpo)
    assert stage_kind(dpo) == "preference"
    assert [p.title for p in panels][:3] == ["Reward margin (chosen − rejected)", "Preference accuracy", "Loss"]
    assert panel_keys(panels)[:3] == [
        ["rewards/margins", "eval_rewards/margins"],
        ["rewards/accuracies"],
        ["loss", "eval_loss"],
    ]
    assert [p.hint for p in panels][:3] == ["higher is better", "higher is better", "lower is better"]
    assert "eval_pairs" not in str(panel_keys(panels))  # a count is never a curve

    rm = history_of("loss", "accuracy", "margin", "reward_mean")
    rm.update(history_of("eval_loss", "eval_accuracy", "eval_margin", steps=(2, 3)))
    assert [p.title for p in curve_panels(rm)] == ["Pair accuracy", "Reward margin", "Loss"]

    sft = history_of("loss", "nll", "accuracy", "learning_rate")
    sft.update(history_of("eval_loss", "eval_accuracy", "eval_tokens", steps=(2, 3)))
    sft["eval_tokens"] = [(2, 640.0), (3, 640.0)]
    panels = curve_panels(sft)
    assert [p.title for p in panels] == ["Loss", "Next-token accuracy"]
    assert panel_keys(panels) == [["loss", "eval_loss"], ["accuracy", "eval_accuracy"]]

    # An unknown stage: its loss, and a panel per changing eval key (what the report did before).
    other = history_of("loss", "eval_foo", "eval_bar")
    other["eval_bar"] = [(1, 2.0), (3, 2.0)]
    assert [(p.title, panel_keys([p])[0]) for p in curve_panels(other)] == [
        ("Loss", ["loss"]),
        ("eval_foo", ["eval_foo"]),
    ]
    # Nothing but a learning rate: the loss panel still stands, empty.
    assert [(p.title, p.series) for p in curve_panels(history_of("learning_rate"))] == [("Loss", ())]


def saved_figures(monkeypatch):
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(fig, path, **kw):
        figures.append(fig)
        return save(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_every_chart_has_a_y_label_title_and_direction(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    grpo = stage_dir(
        tmp_path,
        "grpo",
        [(1, 0.1), (2, 0.3)],
        [(2, {"eval_reward": 0.5, "eval_response_length": 20.0})],
    )
    rows = [{"step": s, "reward/mean": 0.1 * s, "kl": 0.01 * s, "response_length": 10.0 + s} for s in (1, 2)]
    with open(os.path.join(grpo, "metrics.jsonl"), "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    out = write_report(str(tmp_path), {"sft": {"ppl": 3.0}, "grpo": {"ppl": 5.0}}, {"grpo": grpo})
    assert is_png(os.path.join(out, "curves", "grpo.png")) and is_png(os.path.join(out, "metrics", "ppl.png"))
    curves, bars = figures
    visible = [ax for ax in curves.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == [
        "Reward (mean)",
        "KL to the reference",
        "Response length",
        "Policy loss (surrogate)",
    ]
    assert all(ax.get_ylabel() and ax.get_xlabel() == "step" for ax in visible)
    assert "higher is better" in visible[0].get_ylabel()
    assert [line.get_label() for line in visible[0].lines] == ["rollouts", "eval, greedy"]
    (ax,) = bars.axes
    title, ylabel = (text.replace("\n", " ") for text in (ax.get_title(), ax.get_ylabel()))
    assert title == "Perplexity on held-out SFT chats"
    assert ylabel == "Perplexity on held-out SFT chats (lower is better)"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "- reward/mean 0.1 → 0.2 (steps 1 → 2) — Reward (mean), higher is better" in md
    assert "- kl 0.01 → 0.02 (steps 1 → 2) — KL to the reference" in md
