"""The bundled demo data: reproducible byte for byte, valid, small, short chats, eval disjoint from train."""

from __future__ import annotations

import json
import os

import numpy as np

from align_jax.data import DEMO_EVAL, DEMO_TRAIN
from align_jax.data.bpe import train_tokenizer
from align_jax.data.demo.make_demo_data import EVAL_SIZE, TRAIN_SIZE, write_demo_data
from align_jax.data.formats import Origin, to_record
from align_jax.data.tokenize import tokenize_chat


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.readlines()


def test_generator_reproduces_the_bundled_files(tmp_path):
    for path in write_demo_data(str(tmp_path)):
        bundled = DEMO_TRAIN if path.endswith("sft_train.jsonl") else DEMO_EVAL
        with open(path, "rb") as new, open(bundled, "rb") as old:
            assert new.read() == old.read(), f"{bundled} is stale: rerun python -m align_jax.data.demo.make_demo_data"


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


def test_chats_stay_under_100_tokens_with_a_512_token_bpe():
    train = [json.loads(line)["messages"] for line in read_lines(DEMO_TRAIN)]
    evals = [json.loads(line)["messages"] for line in read_lines(DEMO_EVAL)]
    texts = [m["content"] for chat in train for m in chat]
    sample = [train[i] for i in np.random.default_rng(0).choice(len(train), 1500, replace=False)] + evals
    for template in ("chatml", "llama3"):
        tok = train_tokenizer(texts, vocab_size=512, template=template)
        lengths = [len(tokenize_chat(tok, chat)[0]) for chat in sample]
        assert max(lengths) < 100, (template, max(lengths))
