"""PAS end to end on the demo prompts: curate -> complements (template teacher + rule judge) -> SFT rows
-> a few sft-stage steps -> Augmenter over the trained workdir."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from align_jax.data.formats import to_record
from align_jax.pas import (
    Augmenter,
    DemoRuleTagger,
    HashedEmbedder,
    RuleJudge,
    TemplateTeacher,
    curate,
    generate_complements,
    read_prompts,
    sft_rows,
    summarize,
    write_jsonl,
)
from align_jax.pas.teacher import demo_kind
from tests.test_preference_e2e import small

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "align_jax", "data", "demo", "sft_train.jsonl")


@pytest.fixture(scope="module")
def pas_data(tmp_path_factory):
    prompts = read_prompts(DEMO)[:3000]
    cur = curate(
        prompts,
        embedder=HashedEmbedder(),
        dedup_threshold=0.95,
        n_clusters=16,
        per_cluster=20,
        tagger=DemoRuleTagger(),
        balance_cap=100,
        seed=0,
    )
    rows = [{**r, "answer": demo_kind(r["prompt"])[1]} for r in cur.rows]
    out = generate_complements(rows, TemplateTeacher(), RuleJudge(), max_attempts=3, seed=0)
    path = str(tmp_path_factory.mktemp("pas") / "pas_sft.jsonl")
    write_jsonl(path, sft_rows(out))
    return cur, out, path


def test_demo_rows_and_sft_data(pas_data):
    cur, out, path = pas_data
    c = cur.counts
    assert c["input"] == 3000
    assert c["input"] >= c["after_exact_dedup"] >= c["after_dedup"] >= c["after_diversity"] >= c["after_balance"] > 50
    assert max(Counter(r["category"] for r in cur.rows).values()) <= 100
    s = summarize(out)
    # The template teacher flaws ~15% of first attempts; the judge catches them and retries fix most.
    assert s["attempts"].get(2, 0) > 0 and s["valid"] >= 0.95 * s["rows"]
    assert set(s["reasons"]) <= {"answers the prompt", "adds excessive demands"}
    judge = RuleJudge()
    for r in out:
        assert (r["verdict"] == "valid") == judge.check(r["prompt"], r["complement"], demo_kind(r["prompt"])[1]).valid
    with open(path) as f:
        lines = f.read().splitlines()
    assert len(lines) == s["valid"]
    import json

    for line in lines:
        rec = to_record(json.loads(line))
        assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant"]


def test_pas_model_trains_and_augments(pas_data, tmp_path):
    from align_jax import stages

    _, _, path = pas_data
    c = small("sft", steps=4)
    c.data.train, c.data.eval = path, ""
    work = str(tmp_path / "pas")
    summary = stages.get("sft").run(c, work)
    assert summary["final_step"] == 4
    aug = Augmenter.load(work, max_new_tokens=8)
    prompts = ["What is 12 plus 30?", "Reverse the word moon."]
    comps = aug.complements(prompts)
    assert aug.augment(prompts) == [p if not x else f"{p}\n\n{x}" for p, x in zip(prompts, comps, strict=True)]
