"""The bundled demo prompt set: reproducible byte for byte, and no prompt in the training data."""

from __future__ import annotations

import collections
import json
import os
import re

from align_jax.data import DEMO_DIR
from align_jax.data.demo.make_demo_data import HELPFUL, TERSE
from align_jax.eval.constraints import PROMPT_SETS, load_prompt_set, words
from align_jax.eval.data.make_constraints_demo import CATEGORIES, SIZE, write_constraints_demo


def test_generator_reproduces_the_bundled_file(tmp_path):
    path = write_constraints_demo(str(tmp_path))
    with open(path, "rb") as a, open(PROMPT_SETS["demo"], "rb") as b:
        assert a.read() == b.read()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_no_prompt_opens_a_training_chat():
    # Written apart from the generator's own filter: every user-ending prefix of every training chat.
    seen = set()
    user_texts = set()
    for name in ("sft_train.jsonl", "pref_train.jsonl", "rl_train.jsonl"):
        with open(os.path.join(DEMO_DIR, name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                chat = [(m["role"], m["content"]) for m in row.get("messages") or row["prompt"]]
                for i in range(len(chat)):
                    if chat[i][0] == "user":
                        seen.add(tuple(chat[: i + 1]))
                        user_texts.add(chat[i][1])
    rows = load_prompt_set("demo")
    assert len(rows) == SIZE
    assert len({json.dumps(r["prompt"]) for r in rows}) == SIZE  # no duplicates either
    for row in rows:
        assert tuple((m["role"], m["content"]) for m in row["prompt"]) not in seen, row["prompt"]
    # Every question is new even as a bare user text, except the fixed follow-ups and the small-vocabulary
    # requests (lists, upper-casing), which always come under a system prompt the demo never has.
    follow_ups = re.compile(r"Now say that in capital letters\.|Now add \d+ to that\.")
    demo_systems = {HELPFUL, TERSE}
    for row in rows:
        texts = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        if row["category"] in ("list", "upper"):
            assert row["prompt"][0]["role"] == "system" and row["prompt"][0]["content"] not in demo_systems
        else:
            assert not [t for t in texts if t in user_texts and not follow_ups.fullmatch(t)], row["prompt"]


def test_mix_of_categories_and_terse_answers_are_one_word():
    rows = load_prompt_set("demo")
    counts = collections.Counter(r["category"] for r in rows)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 10
    for row in rows:
        terse = row["prompt"][0] == {"role": "system", "content": TERSE}
        has_max_words = any(c["name"] == "max_words" for c in row["checks"])
        assert terse == has_max_words, row
        if terse:
            assert len(words(row["reference"])) == 1


def test_rl_prompt_set_reproduces_and_keeps_the_eval_prompts_unseen(tmp_path):
    from align_jax.config import resolve_data_path
    from align_jax.eval.data.make_constraints_demo import RL_SIZE, write_constraints_rl

    path = write_constraints_rl(str(tmp_path))
    bundled = resolve_data_path("demo:constraints_rl")
    with open(path, "rb") as a, open(bundled, "rb") as b:
        assert a.read() == b.read()
    rl = load_prompt_set(bundled)
    assert len(rl) == RL_SIZE
    eval_rows = load_prompt_set("demo")
    eval_prompts = {json.dumps(r["prompt"]) for r in eval_rows}
    assert not [r for r in rl if json.dumps(r["prompt"]) in eval_prompts]
    follow_ups = re.compile(r"Now say that in capital letters\.|Now add \d+ to that\.")
    eval_questions = {
        m["content"]
        for r in eval_rows
        if r["category"] not in ("list", "upper")
        for m in r["prompt"]
        if m["role"] == "user" and not follow_ups.fullmatch(m["content"])
    }
    for r in rl:
        if r["category"] not in ("list", "upper"):
            asked = {m["content"] for m in r["prompt"] if m["role"] == "user"}
            assert not asked & eval_questions, r["prompt"]
