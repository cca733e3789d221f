"""Win rates and mean rewards with scripted stand-ins whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align_jax.eval.suite import evaluate_model
from align_jax.eval.winrate import compare, load_prompts, mean_reward, win_rate


class Scripted:
    """A ChatModel stand-in: the response to a prompt (keyed by its last user turn) from a table."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0):
        assert temperature == 0.0  # evaluation is greedy
        self.seen.extend(prompts)
        return [self.answers[p[-1]["content"]] for p in prompts]


class LengthScorer:
    """A reward model stand-in: the reward is the response's length; it records the prompts it saw."""

    def __init__(self):
        self.prompts = []

    def score(self, prompts, responses):
        self.prompts.extend(prompts)
        return np.array([len(r) for r in responses], np.float32)


PROMPTS = ["a", "b", "c", "d"]
POLICY = Scripted({"a": "xxx", "b": "xxxxx", "c": "xx", "d": "xxxx"})  # rewards 3 5 2 4
REFERENCE = Scripted({"a": "x", "b": "yyyyy", "c": "yyy", "d": "yyyy"})  # rewards 1 5 3 4


def test_win_rate_counts_ties_half():
    got = win_rate(POLICY, REFERENCE, LengthScorer(), PROMPTS)
    # win, tie, loss, tie -> (1 + 0.5 + 0 + 0.5) / 4; margins 2, 0, -1, 0
    assert got == {"win_rate": 0.5, "policy_reward": 3.5, "reference_reward": 3.25, "margin": 0.25, "n": 4.0}
    assert win_rate(POLICY, POLICY, LengthScorer(), PROMPTS)["win_rate"] == 0.5  # against itself: all ties
    assert win_rate(POLICY, Scripted(dict.fromkeys(PROMPTS, "")), LengthScorer(), PROMPTS)["win_rate"] == 1.0


def test_augment_reaches_the_policy_only_and_the_scorer_sees_the_original_prompt():
    policy, reference, scorer = Scripted(POLICY.answers), Scripted(REFERENCE.answers), LengthScorer()

    def augment(messages):
        return [{"role": "system", "content": "Think first."}, *messages]

    win_rate(policy, reference, scorer, PROMPTS, augment=augment)
    assert all(p[0]["content"] == "Think first." for p in policy.seen)
    assert all(p[0]["role"] == "user" for p in reference.seen)
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in scorer.prompts)


def test_mean_reward_and_errors():
    got = mean_reward(POLICY, LengthScorer(), PROMPTS)
    assert got["mean"] == 3.5 and got["std"] == pytest.approx(np.std([3, 5, 2, 4])) and got["n"] == 4
    with pytest.raises(ValueError, match="no prompts"):
        mean_reward(POLICY, LengthScorer(), [])
    with pytest.raises(ValueError, match="equal, non-empty"):
        compare(np.ones(3), np.ones(2))


def test_load_prompts_reads_prompt_and_messages_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "plain"},
        {"prompt": [{"role": "user", "content": "m"}], "chosen": "x", "rejected": "y"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(str(path)) == ["plain", [{"role": "user", "content": "m"}], [{"role": "user", "content": "q"}]]
    assert load_prompts(str(path), limit=1) == ["plain"]
    assert len(load_prompts("demo:pref_eval", limit=5)) == 5
    path.write_text(json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl line 1"):
        load_prompts(str(path))


def test_evaluate_model_flat_metrics_with_stand_ins(tmp_path):
    sets = tmp_path / "set.jsonl"
    sets.write_text(
        json.dumps({"prompt": "a", "checks": [{"name": "max_words", "n": 1}], "category": "k"})
        + "\n"
        + json.dumps({"prompt": "b", "checks": [{"name": "max_words", "n": 1}, {"name": "no_commas"}]})
        + "\n"
    )
    details = {}
    got = evaluate_model(
        POLICY,
        constraints=str(sets),
        scorer=LengthScorer(),
        reward_prompts=PROMPTS,
        reference=REFERENCE,
        details=details,
    )
    assert got == {
        "constraints/prompt_acc": 1.0,
        "constraints/instruction_acc": 1.0,
        "constraints/n_prompts": 2.0,  # the sample counts the report shows as n=
        "constraints/n_instructions": 3.0,
        "constraints/check/max_words": 1.0,
        "constraints/check/no_commas": 1.0,
        "constraints/category/k": 1.0,
        "reward/mean": 3.5,
        "reward/std": pytest.approx(np.std([3, 5, 2, 4])),
        "reward/n": 4.0,
        "winrate/vs_reference": 0.5,
        "winrate/margin": 0.25,
        "reward/reference_mean": 3.25,
    }
    assert len(details["constraints/examples"]) == 2
    # Only what is configured; limit caps the reward prompts.
    assert evaluate_model(POLICY) == {}
    assert evaluate_model(POLICY, scorer=LengthScorer(), reward_prompts=PROMPTS, limit=1)["reward/mean"] == 3.0
    with pytest.raises(ValueError, match="needs a scorer"):
        evaluate_model(POLICY, reference=REFERENCE)
    with pytest.raises(ValueError, match="needs reward_prompts"):
        evaluate_model(POLICY, scorer=LengthScorer())
