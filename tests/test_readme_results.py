"""launch/readme_results.py: the README's results block is written from a recorded pipeline run, and a
check against another run names every number that drifted."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import readme_results  # noqa: E402

METRICS = {
    "base": {"constraints/prompt_acc": 0.06, "constraints/n_prompts": 200.0, "ppl": 496.2, "ppl/tokens": 6687.0},
    "sft": {"constraints/prompt_acc": 0.875, "constraints/n_prompts": 200.0, "ppl": 3.99, "reward/mean": 0.78},
    "dpo": {
        "constraints/prompt_acc": 0.87,
        "ppl": 3.58,
        "reward/mean": 0.75,
        "reward/n": 96.0,
        "winrate/vs_reference": 0.641,
    },
    "rm": {"rm/accuracy": 0.8, "rm/pairs": 64.0},
}


def recorded_run(path, metrics=METRICS, t=0.2):
    os.makedirs(path / "report")
    (path / "report" / "report.json").write_text(json.dumps({"stages": list(metrics), "metrics": metrics}))
    summary = {
        "seconds": {"sft": 95.0, "dpo": 40.0, "total": 480.0},
        "stage_summaries": {"merge": {"stats": {"t": {"mean": t}}}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def readme(path, body=""):
    path.write_text(f"# x\n\nbefore\n\n{readme_results.BEGIN}\n{body}\n{readme_results.END}\n\nafter\n")
    return str(path)


def test_written_block_then_check_passes_and_drift_is_named(tmp_path, capsys):
    run = recorded_run(tmp_path / "run")
    doc = readme(tmp_path / "README.md")
    assert readme_results.main(["--workdir", run, "--readme", doc]) == 0
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n")  # only the block changes
    assert "| metric | base | sft | dpo |" in text  # the RM has no headline row: not a column
    assert (
        "| constraint following, prompt level (200 demo prompts with programmatic checks) | 0.060 | **0.875** | 0.870 |"
        in text
    )
    assert "| perplexity on held-out SFT chats (6,687 tokens) | 496.20 | 3.99 | **3.58** |" in text  # lower is better
    assert "| win rate against the SFT model under the RM | – | – | 0.641 |" in text
    assert "The RM ranks 80% of the held-out pairs right." in text and "t = 0.20" in text
    assert "8.0 minutes in all (sft 1.6 min, dpo 40 s)" in text
    assert readme_results.main(["--workdir", run, "--readme", doc, "--check"]) == 0

    drifted = dict(METRICS, dpo={**METRICS["dpo"], "winrate/vs_reference": 0.594, "ppl": 3.60})
    other = recorded_run(tmp_path / "other", drifted, t=0.35)
    capsys.readouterr()
    assert readme_results.main(["--workdir", other, "--readme", doc, "--check"]) == 1
    err = capsys.readouterr().err
    assert "winrate/vs_reference [dpo]: README 0.641, run 0.594" in err and "merge t: README 0.2, run 0.35" in err
    assert "ppl [dpo]" not in err  # 0.6% is inside the perplexity tolerance


def test_the_repository_readme_has_a_filled_block():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split(readme_results.BEGIN, 1)[1].split(readme_results.END, 1)[0]
    stated = readme_results._numbers_in(block)
    assert stated.get("constraints/prompt_acc [grpo]") is not None and "minutes in all" in block


def test_a_readme_without_the_block_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("# no block\n")
    with pytest.raises(SystemExit):
        readme_results.main(["--readme", str(tmp_path / "README.md")])  # --workdir is required
    assert (
        readme_results.main(["--workdir", recorded_run(tmp_path / "r"), "--readme", str(tmp_path / "README.md")]) == 2
    )
