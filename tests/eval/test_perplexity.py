"""Held-out perplexity equals a hand computation: each chat alone, forward, log_softmax, masked sum."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from align_jax.data.bpe import train_tokenizer
from align_jax.data.tokenize import tokenize_chat
from align_jax.eval.perplexity import perplexity
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import forward, init_params

CHATS = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}],
    [
        {"role": "system", "content": "Answer with only the result."},
        {"role": "user", "content": "Reverse the word cat."},
        {"role": "assistant", "content": "tac"},
        {"role": "user", "content": "Now say that in capital letters."},
        {"role": "assistant", "content": "TAC"},
    ],
    [{"role": "user", "content": "List two colors."}, {"role": "assistant", "content": "1. red\n2. blue"}],
    [{"role": "user", "content": "Which is larger, 7 or 70?"}, {"role": "assistant", "content": "70 is larger."}],
    [{"role": "user", "content": "What color is snow?"}, {"role": "assistant", "content": "Snow is white."}],
]


@pytest.fixture(scope="module")
def tiny():
    texts = [m["content"] for chat in CHATS for m in chat] * 4
    tok = train_tokenizer(texts, vocab_size=300, template="chatml")
    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        dtype="float32",
    )
    # Host arrays: usable by the sharded pipeline and by the unsharded hand computation alike.
    params = jax.device_get(init_params(cfg, jax.random.key(3)))
    return cfg, params, tok


def hand_nll(cfg, params, tok, chats):
    """(summed NLL, count) of the assistant tokens of each chat on its own (one row each, no packing;
    right padding cannot change a causal model's outputs at earlier positions)."""
    encoded = [tokenize_chat(tok, chat, "assistant") for chat in chats]
    width = max(len(ids) for ids, _ in encoded)
    tokens = np.zeros((len(chats), width), np.int32)
    for row, (ids, _) in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    logits = np.asarray(forward(cfg, params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for row, (ids, mask) in enumerate(encoded):
        targets = np.nonzero(mask[1:])[0]  # token t+1 is predicted at position t
        total -= float(logp[row, targets, ids[targets + 1]].sum())
        count += len(targets)
    return total, count


def test_perplexity_equals_hand_computation(tiny, tmp_path):
    cfg, params, tok = tiny
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    assert max(len(tokenize_chat(tok, c)[0]) for c in CHATS) <= 128  # nothing is truncated
    # Three rows per batch (rounded up to the 8 data devices): the chats pack into rows of 128 tokens.
    got = perplexity(cfg, params, tok, str(path), seq_len=128, batch_size=3)
    total, count = hand_nll(cfg, params, tok, CHATS)
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 0.0 <= got["accuracy"] <= 1.0
    # Random init: about log(V) nats per token, far from a trained model's.
    assert abs(got["nll"] - math.log(cfg.vocab_size)) < 0.5


def test_perplexity_limit_batches_and_empty_input(tiny, tmp_path):
    cfg, params, tok = tiny
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS * 12))
    # 60 chats in 128-token rows: several batches of 8 rows, so one batch holds only part of the tokens.
    one = perplexity(cfg, params, tok, str(path), seq_len=128, batch_size=8, limit_batches=1)
    everything = perplexity(cfg, params, tok, str(path), seq_len=128, batch_size=8)
    _, count = hand_nll(cfg, params, tok, CHATS)
    assert everything["tokens"] == 12 * count
    assert 0 < one["tokens"] < everything["tokens"]
    # Rows of 8 tokens end before any answer starts: nothing to score is an error, not a NaN.
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(cfg, params, tok, str(path), seq_len=8, batch_size=8)
