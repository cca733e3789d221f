"""The bundled demo data: reproducible byte for byte, valid, small, short chats, eval disjoint from train;
the preference pairs well formed, with a mix of failure kinds and informative scores."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from align_jax.data import DEMO_DIR, DEMO_EVAL, DEMO_TRAIN
from align_jax.data.bpe import train_tokenizer
from align_jax.data.demo.make_demo_data import (
    CHOSEN_SCORES,
    CONTENT_FAILURES,
    EVAL_SIZE,
    FAILURE_WEIGHTS,
    FORMAT_FAILURES,
    PREF_EVAL_SIZE,
    PREF_TRAIN_SIZE,
    REJECTED_SCORES,
    TERSE,
    TRAIN_SIZE,
    make_pref_rows,
    write_demo_data,
    write_pref_data,
    write_rl_data,
)
from align_jax.data.formats import Origin, to_record
from align_jax.data.tokenize import tokenize_chat

PREF_TRAIN = os.path.join(DEMO_DIR, "pref_train.jsonl")
PREF_EVAL = os.path.join(DEMO_DIR, "pref_eval.jsonl")


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.readlines()


@pytest.fixture(scope="module")
def pref_rows():
    """(failure kind, row) for the bundled train and eval preference files, as the generator makes them."""
    train, evals = make_pref_rows()
    assert [line for _, line in train] == read_lines(PREF_TRAIN)
    assert [line for _, line in evals] == read_lines(PREF_EVAL)
    return [(k, json.loads(line)) for k, line in train], [(k, json.loads(line)) for k, line in evals]


@pytest.fixture(scope="module")
def demo_tokenizers():
    """512-token BPEs trained on the SFT chats' texts, as the demo trains them."""
    texts = [m["content"] for line in read_lines(DEMO_TRAIN) for m in json.loads(line)["messages"]]
    return {template: train_tokenizer(texts, vocab_size=512, template=template) for template in ("chatml", "llama3")}


def test_generator_reproduces_the_bundled_files(tmp_path):
    paths = write_demo_data(str(tmp_path)) + write_pref_data(str(tmp_path)) + write_rl_data(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == [
        "pref_eval.jsonl",
        "pref_train.jsonl",
        "rl_eval.jsonl",
        "rl_train.jsonl",
        "sft_eval.jsonl",
        "sft_train.jsonl",
    ]
    assert names == sorted(f for f in os.listdir(DEMO_DIR) if f.endswith(".jsonl")), "a bundled file has no generator"
    for path in paths:
        bundled = os.path.join(DEMO_DIR, os.path.basename(path))
        with open(path, "rb") as new, open(bundled, "rb") as old:
            assert new.read() == old.read(), f"{bundled} is stale: rerun python -m align_jax.data.demo.make_demo_data"


def test_demo_directory_is_under_5_mib():
    files = [os.path.join(DEMO_DIR, f) for f in os.listdir(DEMO_DIR)]
    assert sum(os.path.getsize(f) for f in files if os.path.isfile(f)) < 5 * 2**20
    assert os.path.getsize(PREF_TRAIN) + os.path.getsize(PREF_EVAL) <= 1.3 * 2**20


def test_bundled_files_are_small_valid_and_disjoint():
    assert os.path.getsize(DEMO_TRAIN) + os.path.getsize(DEMO_EVAL) < 5 * 2**20
    train, evals = read_lines(DEMO_TRAIN), read_lines(DEMO_EVAL)
    assert (len(train), len(evals)) == (TRAIN_SIZE, EVAL_SIZE)
    assert not set(train) & set(evals)
    records = [
        to_record(json.loads(line), "messages", Origin(DEMO_TRAIN, i + 1, "line")) for i, line in enumerate(train)
    ]
    systems = sum(r["messages"][0]["role"] == "system" for r in records)
    two_turn = sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in records)
    assert 0.2 < systems / len(records) < 0.6 and 0.1 < two_turn / len(records) < 0.4


def test_chats_stay_under_100_tokens_with_a_512_token_bpe(demo_tokenizers):
    train = [json.loads(line)["messages"] for line in read_lines(DEMO_TRAIN)]
    evals = [json.loads(line)["messages"] for line in read_lines(DEMO_EVAL)]
    sample = [train[i] for i in np.random.default_rng(0).choice(len(train), 1500, replace=False)] + evals
    for template, tok in demo_tokenizers.items():
        lengths = [len(tokenize_chat(tok, chat)[0]) for chat in sample]
        assert max(lengths) < 100, (template, max(lengths))


def check_pref_row(row, where):
    keys = {"prompt", "chosen", "rejected"}
    assert set(row) in (keys, keys | {"chosen_score", "rejected_score"}), (where, sorted(row))
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    for m in prompt + chosen + rejected:
        assert set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"].strip(), where
    roles = [m["role"] for m in prompt]
    roles = roles[1:] if roles[0] == "system" else roles
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], (where, roles)
    assert [m["role"] for m in chosen] == [m["role"] for m in rejected] == ["assistant"], where
    assert chosen[0]["content"] != rejected[0]["content"], where
    for side in (chosen, rejected):  # prompt + answer is a valid chat for the SFT reader too
        to_record({"messages": prompt + side}, "messages", where)
    if "chosen_score" in row:
        c, r = row["chosen_score"], row["rejected_score"]
        assert type(c) is float and type(r) is float and 1.0 <= r < c <= 10.0, (where, c, r)


def test_pref_rows_are_well_formed_and_eval_prompts_are_new(pref_rows):
    train, evals = pref_rows
    assert (len(train), len(evals)) == (PREF_TRAIN_SIZE, PREF_EVAL_SIZE)
    for path, rows in ((PREF_TRAIN, train), (PREF_EVAL, evals)):
        for i, (_, row) in enumerate(rows):
            check_pref_row(row, Origin(path, i + 1, "line"))
        scored = sum("chosen_score" in row for _, row in rows) / len(rows)
        assert 0.4 < scored < 0.6, (path, scored)
    train_prompts = {json.dumps(row["prompt"]) for _, row in train}
    eval_prompts = [json.dumps(row["prompt"]) for _, row in evals]
    assert len(set(eval_prompts)) == len(eval_prompts) and not train_prompts & set(eval_prompts)


def test_pref_rows_mix_failure_kinds(pref_rows):
    train, evals = pref_rows
    assert set(FAILURE_WEIGHTS) == set(CONTENT_FAILURES) | set(FORMAT_FAILURES)
    counts = collections.Counter(kind for kind, _ in train)
    assert set(counts) == set(FAILURE_WEIGHTS)
    assert all(n > 0.03 * len(train) for n in counts.values()), counts
    content = sum(counts[k] for k in CONTENT_FAILURES) / len(train)
    assert 0.4 < content < 0.65, counts
    eval_counts = collections.Counter(kind for kind, _ in evals)
    assert len(eval_counts) >= 9 and {"wrong_arithmetic", "wrong_follow_up", "ignored_terse"} <= set(eval_counts)
    # Context matters: some rows have a system prompt or an earlier exchange.
    systems = sum(row["prompt"][0]["role"] == "system" for _, row in train) / len(train)
    history = sum(sum(m["role"] == "user" for m in row["prompt"]) > 1 for _, row in train) / len(train)
    assert 0.2 < systems < 0.5 and 0.1 < history < 0.35, (systems, history)

    # Each kind is what it says.
    for kind, row in train + evals:
        prompt, chosen, rejected = row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"]
        question = prompt[-1]["content"]
        if kind == "ignored_capitals":
            assert rejected != chosen == rejected.upper(), row
        elif kind == "ignored_terse":
            assert prompt[0]["content"] == TERSE and len(rejected) > len(chosen), row
        elif kind == "truncated":
            assert chosen.startswith(rejected) and len(rejected) < len(chosen), row
        elif kind == "repeated_question":
            assert rejected == question, row
        elif kind == "wrong_follow_up":
            assert sum(m["role"] == "user" for m in prompt) == 2 and question.startswith("Now "), row
        elif kind == "wrong_list":
            assert chosen.startswith("1. ") == rejected.startswith("1. "), row  # both numbered, or both terse
        elif kind in CONTENT_FAILURES:  # same form, different content: an answer of about the same length
            assert abs(len(rejected) - len(chosen)) <= 3, row
            assert (chosen == chosen.upper()) == (rejected == rejected.upper()), row


def test_pref_scores_are_informative(pref_rows):
    train, evals = pref_rows
    by_kind = collections.defaultdict(list)
    for kind, row in train + evals:
        if "chosen_score" in row:
            assert CHOSEN_SCORES[0] <= row["chosen_score"] <= CHOSEN_SCORES[1]
            lo, hi = REJECTED_SCORES[kind]
            assert lo <= row["rejected_score"] <= hi, (kind, row)
            by_kind[kind].append(row["rejected_score"])
    assert set(by_kind) == set(FAILURE_WEIGHTS)
    worst_content = min(s for k in CONTENT_FAILURES for s in by_kind[k])
    best_content = max(s for k in CONTENT_FAILURES for s in by_kind[k])
    # Garbage < echo of the question or incomplete answer < wrong answer in the right form < right answer
    # in the wrong form < chosen.
    for kind in ("garbled", "repeated_question", "truncated"):
        assert max(by_kind[kind]) < worst_content, kind
    for kind in ("ignored_capitals", "ignored_terse"):
        assert min(by_kind[kind]) >= best_content and max(by_kind[kind]) < CHOSEN_SCORES[0], kind
    assert np.mean(by_kind["garbled"]) < np.mean(by_kind["truncated"])


def test_pref_pairs_fit_in_256_tokens_with_a_512_token_bpe(demo_tokenizers, pref_rows):
    train, evals = pref_rows
    sample = [train[i][1] for i in np.random.default_rng(0).choice(len(train), 1000, replace=False)]
    sample += [row for _, row in evals]
    for template, tok in demo_tokenizers.items():
        chosen = [len(tokenize_chat(tok, row["prompt"] + row["chosen"])[0]) for row in sample]
        rejected = [len(tokenize_chat(tok, row["prompt"] + row["rejected"])[0]) for row in sample]
        assert max(chosen + rejected) < 112, (template, max(chosen + rejected))  # all rows: <= 101
        pairs = [c + r for c, r in zip(chosen, rejected, strict=True)]
        assert max(pairs) < 220, (template, max(pairs))  # all rows: <= 200


def test_rl_prompts_have_answers_and_eval_is_new():
    def rows(name):
        with open(os.path.join(DEMO_DIR, name), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    train, evals = rows("rl_train.jsonl"), rows("rl_eval.jsonl")
    assert len(train) == 2000 and len(evals) == 200
    for row in train + evals:
        assert set(row) == {"prompt", "answer"} and row["answer"] and " " not in row["answer"]
        assert row["prompt"][-1]["role"] == "user"
    seen = {json.dumps(r["prompt"], sort_keys=True) for r in train}
    assert not any(json.dumps(r["prompt"], sort_keys=True) in seen for r in evals)
