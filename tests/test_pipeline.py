"""The tiny pipeline end to end (every stage, shrunk to a few steps), its report, and its resume rules."""

from __future__ import annotations

import json
import math
import os

import pytest

from align_jax import stages
from align_jax.config import ConfigValueError, validate
from tests.test_configs import load_preset

SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
QUIET = dict(progress=False, log_every=1, eval_every=0, ckpt_every=0, async_checkpoint=False)


def tiny_pipeline():
    c = load_preset("pipeline", "tiny")
    c.unlock()
    c.sft.model.update(**SMALL)
    for name in ("sft", "pas", "rm", "dpo", "grpo"):
        c[name].data.update(seq_len=128, batch_size=8, eval_batches=1)
        c[name].train.update(steps=4, **QUIET)
    c.sft.train.steps = 8
    c.pas.update(max_prompts=400, n_clusters="8", per_cluster=10, balance_cap=0)
    c.grpo.data.batch_size = 24  # 8 prompts x 3 samples over the 8 test devices
    c.grpo.update(group_size=3, max_prompt_len=64, max_new_tokens=8, eval_prompts=8, ptx_batch_size=8)
    c.eval.update(num_reward_prompts=8, limit=16, max_new_tokens=8, ppl_batches=1, batch_size=8, seq_len=128)
    return c


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_writes_the_report_and_skips_what_is_done(tmp_path):
    work = str(tmp_path / "demo")
    c = tiny_pipeline()
    out = stages.get("pipeline").run(c, work)

    for name in ("sft", "pas", "rm", "dpo", "grpo", "merge"):
        assert os.path.isfile(os.path.join(work, name, "summary.json")), name
    with open(os.path.join(work, "report", "report.json")) as f:
        report = json.load(f)
    table = out["metrics"]
    assert list(table) == ["base", "sft", "rm", "dpo", "grpo", "merge"]  # pipeline order, base first
    for name in ("base", "sft", "dpo", "grpo", "merge"):
        m = table[name]
        for key in ("constraints/prompt_acc", "ppl", "reward/mean"):
            assert math.isfinite(m[key]), (name, key)
        assert 0.0 <= m["constraints/prompt_acc"] <= 1.0
        assert "pas/prompt_acc" in m  # the same prompts, augmented by the PAS model
    assert "winrate/vs_reference" in table["dpo"] and "winrate/vs_reference" not in table["sft"]
    assert 0.0 <= table["rm"]["rm/accuracy"] <= 1.0
    with open(os.path.join(work, "report", "report.md")) as f:
        md = f.read()
    assert "constraints/prompt_acc" in md and "| merge" in md.replace("|merge", "| merge")
    assert any(p.endswith(".png") for _, _, files in os.walk(os.path.join(work, "report")) for p in files)
    assert report  # the same numbers as JSON
    with open(os.path.join(work, "merge", "summary.json")) as f:
        assert json.load(f)["method"] == "model_stock"
    with open(os.path.join(work, "pas", "pas_data", "complements.jsonl")) as f:
        row = json.loads(f.readline())
    assert set(row) == {"prompt", "complement", "category", "verdict", "reason", "attempts"}

    # A second run finds every stage complete: nothing retrains, the eval results are reused.
    again = stages.get("pipeline").run(tiny_pipeline(), work)
    with open(os.path.join(work, "summary.json")) as f:
        summaries = json.load(f)["stage_summaries"]
    assert all(summaries[s].get("skipped") for s in ("sft", "pas", "rm", "dpo", "grpo", "merge"))
    assert again["metrics"] == out["metrics"]
    # The stage times (the README's) stay those of the run that did the work.
    trained = {k: v for k, v in out["seconds"].items() if k not in ("eval", "total")}
    assert all(v > 0 for v in trained.values()) and {k: again["seconds"][k] for k in trained} == trained

    # More DPO steps: only DPO resumes (from its checkpoint), and only what depends on it is re-measured.
    c = tiny_pipeline()
    c.dpo.train.steps = 6
    third = stages.get("pipeline").run(c, work)
    with open(os.path.join(work, "summary.json")) as f:
        summaries = json.load(f)["stage_summaries"]
    assert summaries["dpo"]["start_step"] == 4 and summaries["dpo"]["final_step"] == 6
    assert summaries["sft"].get("skipped") and summaries["grpo"].get("skipped")
    assert not summaries["merge"].get("skipped")  # one of its sources changed: merged again
    assert third["metrics"]["sft"] == out["metrics"]["sft"]
    assert third["metrics"]["dpo"] != out["metrics"]["dpo"] and third["metrics"]["merge"] != out["metrics"]["merge"]

    # Other settings for a stage that already trained: an error that says what differs, before any work.
    c = tiny_pipeline()
    c.dpo.train.steps = 6
    c.dpo.beta = 0.5
    with pytest.raises(ValueError, match=r"dpo.beta: 0.1 -> 0.5.*delete it to retrain the dpo stage"):
        stages.get("pipeline").run(c, work)


def test_pipeline_config_is_checked_before_anything_runs():
    c = load_preset("pipeline", "tiny")
    c.unlock()
    c.stages = "sft,dpo,sft"
    with pytest.raises(ConfigValueError, match="each stage at most once"):
        validate(c)
    c.stages = "sft,dpo"
    c.dpo.beta = -1.0
    with pytest.raises(ConfigValueError, match=r"config.dpo: config.dpo.beta must be positive"):
        validate(c)


def test_eval_settings_are_checked_before_training(tmp_path):
    c = load_preset("pipeline", "tiny")
    c.unlock()
    c.stages = "sft,dpo,eval"  # eval's defaults name the rm, pas, grpo and merge stages
    with pytest.raises(ValueError, match=r"config.eval.rm='stage:rm': stage 'rm' must run before 'eval'"):
        stages.get("pipeline").run(c, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_stage_references_must_point_backwards(tmp_path):
    c = load_preset("pipeline", "tiny")
    c.unlock()
    c.stages = "rm,sft"  # rm's init_from is stage:sft, which would not exist yet
    with pytest.raises(ValueError, match=r"config.rm.init_from='stage:sft': stage 'sft' must run before 'rm'"):
        stages.get("pipeline").run(c, str(tmp_path))
