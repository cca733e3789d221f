"""The instruction-following checks, prompt-set validation and scoring."""

from __future__ import annotations

import json

import pytest

from align_jax.eval import constraints as C
from align_jax.eval.constraints import (
    CHECKS,
    evaluate_constraints,
    load_prompt_set,
    run_checks,
    score_responses,
    sentences,
    words,
)

# (check, kwargs, response, expected)
CASES = [
    ("max_words", {"n": 5}, "3 plus 4 is 7.", True),
    ("max_words", {"n": 4}, "3 plus 4 is 7.", False),
    ("max_words", {"n": 0}, "", True),
    ("min_words", {"n": 2}, "don't stop-now", True),  # inner apostrophes and hyphens keep a word whole
    ("min_words", {"n": 3}, "don't stop-now", False),
    ("min_words", {"n": 1}, "����", False),  # symbols are no words
    ("max_sentences", {"n": 3}, "One. Two! Three?", True),
    ("max_sentences", {"n": 2}, "One. Two! Three?", False),
    ("max_sentences", {"n": 1}, "Pi is about 3.14 today.", True),  # no space after the point: one sentence
    ("max_sentences", {"n": 2}, "1. fox\n2. dog", True),  # list numbers are no sentences
    ("max_sentences", {"n": 1}, "first line\nsecond line", False),
    ("all_capitals", {}, "3 PLUS 4 IS 7.", True),
    ("all_capitals", {}, "3 Plus 4", False),
    ("all_capitals", {}, "42", False),  # a bare number is not "in capitals"
    ("all_capitals", {}, "ÉTÉ", True),
    ("all_lowercase", {}, "hello, world 42", True),
    ("all_lowercase", {}, "hello World", False),
    ("all_lowercase", {}, "42!", False),
    ("include_keywords", {"keywords": ["cat", "Mat"]}, "The CAT sat on the mat.", True),
    ("include_keywords", {"keywords": ["cat"]}, "A category of dogs.", False),  # whole words only
    ("include_keywords", {"keywords": ["ice cream"]}, "I like ice   cream!", True),
    ("include_keywords", {"keywords": ["cat", "dog"]}, "Only a cat here.", False),
    ("exclude_keywords", {"keywords": ["big"]}, "A huge elephant; bigger than a car.", True),
    ("exclude_keywords", {"keywords": ["big", "huge"]}, "A Huge elephant.", False),
    ("numbered_list", {"n": 3}, "1. fox\n2. bear\n3. cow", True),
    ("numbered_list", {"n": 2}, "Here:\n1) fox\n 2) bear\nThat's all.", True),  # intro and outro lines allowed
    ("numbered_list", {"n": 2}, "1. fox\n2. bear\n3. cow", False),
    ("numbered_list", {"n": 3}, "1. fox\n3. bear\n3. cow", False),  # out of order
    ("numbered_list", {"n": 2}, "2. fox\n1. bear", False),
    ("numbered_list", {"n": 1}, "1.fox", False),  # "1." needs a space after it
    ("bullet_list", {"n": 3}, "- a\n* b\n• c", True),
    ("bullet_list", {"n": 2}, "- a\n* b\n• c", False),
    ("bullet_list", {"n": 1}, "-a\n- b", True),  # "-a" is no bullet
    ("starts_with", {"prefix": "Yes"}, "  yes, it is.", True),
    ("starts_with", {"prefix": "Yes"}, "Well, yes.", False),
    ("ends_with", {"suffix": "Any other questions?"}, "Done. any other questions?\n", True),
    ("ends_with", {"suffix": "Done."}, "Done", False),
    ("no_commas", {}, "No commas here.", True),
    ("no_commas", {}, "One, two", False),
    ("no_commas", {}, "一，二", False),  # the full-width comma counts too
    ("json_format", {}, ' {"a": [1, 2]} ', True),
    ("json_format", {}, '```json\n{"a": 1}\n```', True),
    ("json_format", {}, "[1, 2, 3]", True),
    ("json_format", {}, 'Here it is: {"a": 1}', False),
    ("json_format", {}, "", False),
    ("language", {"lang": "en"}, "Hello world, café included.", True),
    ("language", {"lang": "en"}, "Привет, мир", False),
    ("language", {"lang": "en"}, "Ça été où déjà", False),  # Latin, but too many accents for English
    ("language", {"lang": "fr"}, "Ça été où déjà", True),
    ("language", {"lang": "en"}, "Hello 世界", False),  # 5 of 7 letters Latin: under 90%
    ("language", {"lang": "en"}, "12345 !!", False),  # no letters at all
    ("language", {"lang": "ru"}, "Красный, синий и зелёный.", True),
    ("language", {"lang": "zh"}, "法国的首都是巴黎。", True),
    ("language", {"lang": "ja"}, "元気です。ありがとう。", True),
    ("language", {"lang": "ko"}, "오늘은 월요일입니다.", True),
    ("language", {"lang": "ar"}, "اسمي مساعد.", True),
    ("language", {"lang": "ar"}, "My name is Sam.", False),
    ("language", {"lang": "cyrillic"}, "Добрый день", True),
    ("language", {"lang": "latin"}, "Добрый день", False),
]


@pytest.mark.parametrize(("name", "kwargs", "response", "expected"), CASES)
def test_check(name, kwargs, response, expected):
    assert CHECKS[name].fn(response, **kwargs) is expected


def test_every_check_has_passing_and_failing_cases():
    seen = {(name, expected) for name, _, _, expected in CASES}
    for name in CHECKS:
        assert (name, True) in seen and (name, False) in seen, name


def test_text_units():
    assert words("3 plus 4 is 7.") == ["3", "plus", "4", "is", "7"]
    assert words("1. fox") == ["1", "fox"]
    assert sentences("A cat. A dog!\nA bird") == ["A cat.", "A dog!", "A bird"]


def _write(tmp_path, rows, name="set.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "Say hi.", "checks": [{"name": "max_words", "n": 3}]}


@pytest.mark.parametrize(
    ("bad", "field", "message"),
    [
        ({"prompt": "x", "checks": [{"name": "max_word", "n": 3}]}, "checks[0].name", "unknown check 'max_word'"),
        ({"prompt": "x", "checks": [{"name": "max_words", "n": "3"}]}, "checks[0].n", "integer >= 0"),
        ({"prompt": "x", "checks": [{"name": "max_words", "n": True}]}, "checks[0].n", "integer >= 0"),
        ({"prompt": "x", "checks": [{"name": "numbered_list", "n": 0}]}, "checks[0].n", "integer >= 1"),
        ({"prompt": "x", "checks": [{"name": "max_words"}]}, "checks[0]", "needs ['n']"),
        ({"prompt": "x", "checks": [{"name": "no_commas", "n": 1}]}, "checks[0]", "unknown ['n']"),
        ({"prompt": "x", "checks": [{"name": "include_keywords", "keywords": "cat"}]}, "checks[0].keywords", "list"),
        ({"prompt": "x", "checks": [{"name": "include_keywords", "keywords": []}]}, "checks[0].keywords", "list"),
        ({"prompt": "x", "checks": [{"name": "starts_with", "prefix": ""}]}, "checks[0].prefix", "non-empty"),
        ({"prompt": "x", "checks": [{"name": "language", "lang": "klingon"}]}, "checks[0].lang", "unknown language"),
        ({"prompt": "x", "checks": []}, "checks", "non-empty list"),
        ({"prompt": "x"}, "checks", "non-empty list"),
        ({"checks": [{"name": "no_commas"}]}, "prompt", "missing"),
        ({"prompt": "", "checks": [{"name": "no_commas"}]}, "prompt", "empty"),
        (
            {
                "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "checks": [{"name": "no_commas"}],
            },
            "prompt[1].role",
            "last message",
        ),
        ({"prompt": [{"role": "bot", "content": "a"}], "checks": [{"name": "no_commas"}]}, "prompt[0]", "role"),
        ({"prompt": "x", "checks": [{"name": "no_commas"}], "categry": "a"}, "categry", "unknown field"),
        ({"prompt": "x", "checks": [{"name": "no_commas"}], "category": 3}, "category", "string"),
    ],
)
def test_load_prompt_set_names_file_line_and_field(tmp_path, bad, field, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(ValueError) as e:
        load_prompt_set(path)
    text = str(e.value)
    assert path in text and "line 2" in text and f"field {field!r}" in text and message in text, text


def test_load_prompt_set_bad_json_and_empty(tmp_path):
    with pytest.raises(ValueError, match=r"set\.jsonl line 2: not valid JSON"):
        load_prompt_set(_write(tmp_path, [GOOD, "{oops"]))
    with pytest.raises(ValueError, match="no prompts"):
        load_prompt_set(_write(tmp_path, [], name="empty.jsonl"))


def test_load_prompt_set_normalises_and_limits(tmp_path):
    rows = [
        GOOD,
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "checks": [{"name": "no_commas"}],
            "category": "c",
            "reference": "ok",
        },
    ]
    got = load_prompt_set(_write(tmp_path, [*rows, GOOD]))
    assert len(got) == 3 and got[0]["category"] == "" and got[1]["reference"] == "ok"
    assert got[1]["prompt"][1] == {"role": "user", "content": "u"}
    assert len(load_prompt_set(_write(tmp_path, [*rows, GOOD]), limit=2)) == 2


def test_score_responses_closed_form():
    rows = [
        {"prompt": "a", "checks": [{"name": "max_words", "n": 2}, {"name": "all_capitals"}], "category": "x"},
        {"prompt": "b", "checks": [{"name": "no_commas"}], "category": "x"},
        {"prompt": "c", "checks": [{"name": "min_words", "n": 1}, {"name": "no_commas"}, {"name": "all_lowercase"}]},
    ]
    got = score_responses(rows, ["HI THERE", "a, b", "hello, world"])
    assert got["prompt_acc"] == pytest.approx(1 / 3)
    assert got["instruction_acc"] == pytest.approx(4 / 6)  # 2 of 2, 0 of 1, 2 of 3
    assert got["n_prompts"] == 3 and got["n_instructions"] == 6
    assert got["per_check"] == {
        "all_capitals": 1.0,
        "all_lowercase": 1.0,
        "max_words": 1.0,
        "min_words": 1.0,
        "no_commas": 0.0,
    }
    assert got["per_category"] == {"x": 0.5}
    assert run_checks(rows[2], "hello, world") == [True, False, True]
    with pytest.raises(ValueError, match="3 prompt rows but 2 responses"):
        score_responses(rows, ["a", "b"])


class Scripted:
    """A stand-in ChatModel: answers each prompt (keyed by its last user turn) from a table."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0):
        self.seen.extend(prompts)
        return [self.answers.get(p[-1]["content"], "") for p in prompts]


def test_evaluate_constraints_with_a_scripted_model(tmp_path):
    rows = [
        {"prompt": "one", "checks": [{"name": "all_capitals"}]},
        {"prompt": "two", "checks": [{"name": "all_capitals"}, {"name": "max_words", "n": 1}]},
        {"prompt": "three", "checks": [{"name": "no_commas"}]},
    ]
    path = _write(tmp_path, rows)
    model = Scripted({"one": "YES", "two": "NO WAY", "three": "fine"})

    def augment(messages):
        return [{"role": "system", "content": "Follow the instructions."}, *messages]

    got = evaluate_constraints(model, path, augment=augment, n_examples=2)
    assert got["prompt_acc"] == pytest.approx(2 / 3) and got["instruction_acc"] == pytest.approx(3 / 4)
    assert all(p[0]["content"] == "Follow the instructions." for p in model.seen)
    # Failures first; the prompt shown is the original one.
    assert got["examples"][0] == {"prompt": "two", "response": "NO WAY", "passed": False, "failed": ["max_words"]}
    assert got["examples"][1]["passed"] and len(got["examples"]) == 2


@pytest.mark.parametrize("name", sorted(C.PROMPT_SETS))
def test_bundled_sets_validate_and_their_references_pass(name):
    rows = load_prompt_set(name)
    assert len(rows) >= 60
    assert all("reference" in r for r in rows)
    for row in rows:
        assert all(run_checks(row, row["reference"])), row
    # Every check of the registry the set uses is exercised by some row; a demo set needs a few kinds.
    used = {c["name"] for r in rows for c in r["checks"]}
    assert len(used) >= (5 if name == "demo" else len(CHECKS))
