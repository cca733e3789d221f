"""Rule rewards, the registry, and weighted sums."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax import rewards


def test_exact_match_whole_words():
    fn = rewards.RULES["exact_match"]()
    rows = [{"answer": "38"}] * 5 + [{"answer": "GOD"}]
    responses = ["35 plus 3 is 38.", "138", "3.8", "The answer: 38", "38.5", "dog reversed is god."]
    np.testing.assert_array_equal(fn([""] * 6, responses, rows), [1, 0, 0, 1, 0, 1])
    strict = rewards.RULES["exact_match"](case_sensitive=True)
    assert strict([""], ["dog reversed is god."], [{"answer": "GOD"}])[0] == 0
    with pytest.raises(KeyError, match="no 'answer' field"):
        fn([""], ["x"], [{}])


def test_other_rules():
    prompts = ["Answer in capital letters: Reverse the word dog.", [{"role": "user", "content": "What is 2 plus 2?"}]]
    np.testing.assert_array_equal(rewards.RULES["capitals"]()(prompts, ["GOD", "four"], [{}, {}]), [1, 1])
    np.testing.assert_array_equal(rewards.RULES["capitals"]()(prompts, ["god", "four"], [{}, {}]), [0, 1])
    np.testing.assert_allclose(
        rewards.RULES["length_penalty"](max_chars=3, per_char=0.5)(["", ""], ["abcdef", "ab"], [{}, {}]), [-1.5, 0]
    )
    np.testing.assert_array_equal(rewards.RULES["max_words"](limit=2)(["", ""], ["a b", "a b c"], [{}, {}]), [1, 0])
    np.testing.assert_array_equal(rewards.RULES["format"](pattern=r"^\d+$")(["", ""], ["42", "x42"], [{}, {}]), [1, 0])


def test_weighted_sum_and_spec_errors():
    reward = rewards.build_reward(
        "exact_match:2.0, length_penalty", rule_kwargs={"length_penalty": {"max_chars": 2, "per_char": 1.0}}
    )
    total, parts = reward(["", ""], ["7", "seven"], [{"answer": "7"}, {"answer": "7"}])
    np.testing.assert_allclose(total, [2.0, -3.0])
    assert set(parts) == {"exact_match", "length_penalty"}
    with pytest.raises(ValueError, match="unknown reward rule 'nope'"):
        rewards.build_reward("nope:1")
    with pytest.raises(ValueError, match="not a number"):
        rewards.build_reward("exact_match:x")
    with pytest.raises(ValueError, match="unknown reward rules"):
        rewards.build_reward("exact_match", rule_kwargs={"typo": {}})
    with pytest.raises(ValueError, match="no reward"):
        rewards.build_reward("")
    with pytest.raises(ValueError, match="registered already"):
        rewards.register("exact_match")(lambda: None)


def test_constraints_rule_is_the_share_of_checks_passed():
    from align_jax.rewards import RULES

    fn = RULES["constraints"]()
    row = {"prompt": "List two fruits.", "checks": [{"name": "numbered_list", "n": 2}, {"name": "all_lowercase"}]}
    rows = [row, row, row, {"prompt": "hi", "answer": "x"}]
    got = fn([r["prompt"] for r in rows], ["1. apple\n2. pear", "1. Apple\n2. pear", "apple, pear", "1. a"], rows)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="prompt row 0"):
        fn(["p"], ["r"], [{"prompt": "p", "checks": [{"name": "no_such_check"}]}])
