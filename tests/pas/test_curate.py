"""curate(): what each step keeps, on prompts whose embeddings, scores and tags are scripted."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax.pas.curate import curate
from align_jax.pas.embed import HashedEmbedder
from align_jax.pas.quality import JudgeQuality, RewardQuality, parse_score
from align_jax.pas.tags import CentroidTagger, TeacherTagger, parse_category
from align_jax.pas.templates import DEMO_TAG_EXAMPLES


class TableEmbedder:
    """Embeds each prompt by a lookup table; records what it was asked to embed."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def embed(self, texts):
        self.asked.append(list(texts))
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def topic(axis, wiggle):
    v = np.zeros(8, np.float32)
    v[axis], v[4 + axis % 4] = 1.0, wiggle
    return v


# Three topics (axes 0, 1, 2), four distinct prompts each, a near-duplicate in topic 0 and exact
# duplicates (case / whitespace variants) in topic 1.
TABLE = {f"t{a} p{i}": topic(a, 0.1 * (i + 1)) for a in range(3) for i in range(4)}
TABLE["t0 p0 again"] = topic(0, 0.1) + np.float32(1e-4)
PROMPTS = [*TABLE, "T1  P0", "t1 p0", " t1 p1 "]


class ScoreBy:
    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts):
        return np.array([self.scores.get(p, np.nan) for p in prompts], np.float32)


class TagByTopic:
    def tag(self, prompts, embeddings):
        assert len(embeddings) == len(prompts)
        return [f"topic{p[1]}" for p in prompts]


def test_counts_per_step():
    emb = TableEmbedder(TABLE)
    scores = {p: float(p[-1]) for p in TABLE if p.endswith(tuple("0123"))}  # "... p3" scores 3
    scores.pop("t2 p3")  # unscorable
    res = curate(
        PROMPTS,
        embedder=emb,
        dedup_threshold=0.999,
        n_clusters=3,
        per_cluster=3,
        quality=ScoreBy(scores),
        min_quality=2.0,
        tagger=TagByTopic(),
        balance_cap=1,
        seed=0,
    )
    assert res.counts == {
        "input": 16,
        "after_exact_dedup": 13,  # "T1  P0", "t1 p0", " t1 p1 " repeat earlier prompts
        "after_dedup": 12,  # "t0 p0 again" is a near-duplicate of "t0 p0"
        # 3 per topic cluster, nearest the centroid: on the unit circle p0..p3 sit at 5.7, 11.3, 16.7
        # and 21.8 degrees, their mean direction at ~14 degrees, so p1, p2, p3.
        "after_diversity": 9,
        "unscored": 1,
        "after_quality": 5,  # the p1s score 1 < 2, and t2 p3 has no score
        "after_balance": 3,
    }
    assert emb.asked == [[p for p in TABLE]]  # embedded once, after exact dedup
    # Balance keeps the best-scored prompt of each topic.
    assert [(r["prompt"], r["category"], r["quality"]) for r in res.rows] == [
        ("t0 p3", "topic0", 3.0),
        ("t1 p3", "topic1", 3.0),
        ("t2 p2", "topic2", 2.0),
    ]
    clusters = [r["cluster"] for r in res.rows]
    assert len(set(clusters)) == 3
    assert [PROMPTS[r["index"]] for r in res.rows] == res.prompts
    assert set(res.seconds) == {"exact_dedup", "embed", "dedup", "diversity", "quality", "tag", "balance"}


def test_no_optional_steps():
    res = curate(PROMPTS, embedder=TableEmbedder(TABLE), dedup_threshold=0.999, n_clusters=(3, 2), per_cluster=None)
    assert res.counts["after_diversity"] == res.counts["after_quality"] == res.counts["after_balance"] == 12
    assert {r["category"] for r in res.rows} == {"other"} and all(r["quality"] is None for r in res.rows)
    # Hierarchical clustering: 3 topics x 2 sub-clusters.
    assert len({r["cluster"] for r in res.rows}) == 6
    empty = curate(["", "  "], embedder=HashedEmbedder())
    assert empty.rows == [] and empty.counts["after_exact_dedup"] == empty.counts["after_balance"] == 0
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        curate(["a", 3], embedder=HashedEmbedder())
    with pytest.raises(ValueError, match="n_clusters"):
        curate(["a"], embedder=HashedEmbedder(), n_clusters=0)


def test_hashed_curation_of_demo_like_prompts():
    prompts = [f"What is {a} plus {b}?" for a in range(5) for b in range(5)]
    prompts += [f"Reverse the word {w}." for w in ("apple", "bread", "chair", "cloud")] * 3
    res = curate(prompts, embedder=HashedEmbedder(), dedup_threshold=0.99, n_clusters=2, per_cluster=3, seed=0)
    assert res.counts["after_exact_dedup"] == 29
    assert res.counts["after_diversity"] == 6
    kinds = sorted(r["prompt"].split()[0] for r in res.rows)
    assert kinds == ["Reverse"] * 3 + ["What"] * 3  # one cluster per template


def test_progress_bar_names_each_step(capsys):
    prompts = ["What is 2 plus 3?", "Name a red fruit.", "What is 2 plus 3?", "Write a haiku about rain."]
    curate(prompts, embedder=HashedEmbedder(), n_clusters=2, per_cluster=None, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "curate:" in line]
    steps = ("exact_dedup", "embed", "dedup", "diversity", "quality", "tag", "balance")
    assert [line.split("curate: ")[1].split(" ")[0] for line in lines] == list(steps)
    assert lines[0].count("/7") == 1 and "(3 prompts)" in lines[0]  # after exact dedup


def test_judge_quality_parses_scores():
    class Replies:
        def __init__(self, replies):
            self.replies, self.chats = replies, []

        def generate(self, chats, **kw):
            self.chats += chats
            return [self.replies[c[-1]["content"].split("\n")[1]] for c in chats]

    model = Replies({"a": "Score: 7", "b": "8/10", "c": "no idea", "d": "10", "e": "7.5"})
    q = JudgeQuality(model, batch=2)
    np.testing.assert_array_equal(q.score(list("abcde")), [7, 8, np.nan, 10, np.nan])
    assert len(model.chats) == 5 and q.replies[2] == "no idea"
    assert [parse_score(s) for s in ("0", "11", "I'd say 3.", "")] == [pytest.approx(np.nan, nan_ok=True)] * 2 + [
        3.0,
        pytest.approx(np.nan, nan_ok=True),
    ]


def test_reward_quality_scores_with_placeholder_response():
    class Scorer:
        def score(self, prompts, responses):
            assert responses == ["OK."] * len(prompts)
            return np.array([len(p) for p in prompts], np.float32)

    np.testing.assert_array_equal(RewardQuality(Scorer()).score(["ab", "abcd"]), [2, 4])


def test_taggers():
    emb = HashedEmbedder()
    tagger = CentroidTagger(emb, DEMO_TAG_EXAMPLES)
    prompts = ["What is 3 plus 9?", "Which is larger, 5 or 50?", "Reverse the word moon.", "List three colors."]
    assert tagger.tag(prompts, emb.embed(prompts)) == ["arithmetic", "comparison", "word", "list"]
    strict = CentroidTagger(emb, DEMO_TAG_EXAMPLES, min_similarity=0.99)
    assert strict.tag(prompts[:1], emb.embed(prompts[:1])) == ["other"]

    class Replies:
        def generate(self, chats, **kw):
            assert "Categories: math, code" in chats[0][0]["content"]
            return ["Category: Code.", "It is math, not code", "poetry", "mathematics"]

    assert TeacherTagger(Replies(), ["math", "code"]).tag(list("abcd")) == ["code", "math", "other", "other"]
    assert parse_category("WRITING", ["math", "writing"]) == "writing"
