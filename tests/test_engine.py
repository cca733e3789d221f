"""The refill engine (`generate_many`): greedy equal to `generate` token for token (rolls of the cache
and a sliding window included), sampling keyed per prompt (independent of slots, order and refill
timing, equal to `generate(row_keys=True)`), eos and per-prompt limits, prompts wider than the bucket,
and a bounded number of programs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import align_jax as aj
from align_jax.engine import compile_count, generate_many
from align_jax.sharding import Sharder, make_mesh
from tests import hf_models

EOS = hf_models.COMMON["eos_token_id"]
VOCAB = hf_models.COMMON["vocab_size"]
NEW = 12
# Prefill buckets 16 and 32, more prompts than slots. Every test runs the engine with these slots,
# chunk, widest bucket and new tokens, so the programs compiled once serve them all (fast tests).
LENGTHS = (5, 30, 1, 17, 9, 32, 3, 12, 26, 7, 2)
SHAPE = dict(slots=3, chunk=4)


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Mistral: its sliding window (5) is shorter than most prompts + completions, so a window counted in
    cache slots would show up across refills and rolls. One model for all tests: the programs compiled
    for the first serve the others."""
    path = hf_models.save(hf_models.build("mistral", seed=1), tmp_path_factory.mktemp("mistral"))
    return (*aj.load_pretrained(path, dtype="float32"), path)


def assert_same(out, ref, atol=1e-5):
    for name in ("tokens", "lengths", "sequences", "prompt_lengths"):
        np.testing.assert_array_equal(getattr(out, name), np.asarray(getattr(ref, name)), err_msg=name)
    np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs), atol=atol)


def test_greedy_equals_generate(model):
    """3 slots and 4-step chunks: rows refill mid-stream and the cache rolls several times."""
    cfg, params, _ = model
    ps = prompts()
    ref = aj.generate(cfg, params, ps, max_new_tokens=NEW, eos_id=EOS)
    out = generate_many(cfg, params, ps, max_new_tokens=NEW, eos_id=EOS, **SHAPE)
    assert out.tokens.shape == (len(ps), NEW) and out.sequences.shape == (len(ps), 32 + NEW)
    assert_same(out, ref)


def test_sampling_is_keyed_per_prompt(model):
    """A prompt's samples depend on its index only: another queue order (so other slots and refill
    times) and prefill groups give the same tokens, and so does `generate(row_keys=True)` over the whole
    batch. Thirty eos ids at temperature 2 end rows early at different steps."""
    cfg, params, _ = model
    ps = prompts(seed=1)
    eos = list(range(3, 33))
    kw = dict(max_new_tokens=NEW, temperature=2.0, eos_id=eos, seed=7, **SHAPE)
    a = generate_many(cfg, params, ps, **kw)
    assert a.lengths.min() < NEW and len(set(a.lengths.tolist())) > 2, a.lengths  # the eos ids do end rows
    b = generate_many(cfg, params, ps, sort_by_length=False, **kw)
    assert_same(b, a)
    del kw["slots"], kw["chunk"]
    assert_same(a, aj.generate(cfg, params, ps, row_keys=True, **kw))
    # Each row ends at its first eos (or the limit), then pad and zero log-prob.
    for row, lp, n in zip(a.tokens, a.logprobs, a.lengths, strict=True):
        hits = [i for i, t in enumerate(row[:n]) if t in eos]
        assert hits == ([n - 1] if n < NEW else hits[:1])
        assert np.all(row[n:] == 0) and np.all(lp[n:] == 0.0) and np.all(lp[:n] < 0.0)
    other = generate_many(cfg, params, ps, **{**kw, "seed": 8}, **SHAPE)
    assert not np.array_equal(other.tokens, a.tokens)


def test_limits_buckets_and_programs(model):
    """Per-prompt max_new_tokens; prompts wider than `prompt_bucket`; calls with other prompts, limits,
    temperature and seed, and a fixed prompt width, compile nothing new."""
    cfg, params, _ = model
    ps = prompts(lengths=(20, 3, 31, 9, 30), seed=2)
    limits = [1, 12, 5, 7, 2]
    out = generate_many(cfg, params, ps, max_new_tokens=limits, eos_id=(), prompt_bucket=16, **SHAPE)
    assert out.lengths.tolist() == limits and out.sequences.shape == (5, 32 + NEW)
    ref = aj.generate(cfg, params, ps, max_new_tokens=NEW, eos_id=(), prompt_bucket=16)
    tokens, seqs = np.asarray(ref.tokens), np.asarray(ref.sequences)
    for i, n in enumerate(limits):  # greedy: a shorter limit gives a prefix of the full continuation
        end = len(ps[i]) + n
        assert out.tokens[i, :n].tolist() == tokens[i, :n].tolist() and np.all(out.tokens[i, n:] == 0)
        assert out.sequences[i, :end].tolist() == seqs[i, :end].tolist() and np.all(out.sequences[i, end:] == 0)
    kw = dict(eos_id=list(range(3, 33)), prompt_bucket=16, **SHAPE)  # the programs test_sampling compiled
    n = compile_count()
    generate_many(cfg, params, prompts(lengths=(32, 2, 18), seed=3), max_new_tokens=[12, 3, 4], temperature=0.5,
                  seed=4, **kw)  # fmt: skip
    m = compile_count()
    assert m - n <= 3  # sampling: a decode chunk and a prefill per bucket (16, 32), unless compiled already
    # Short prompts in the same fixed prompt width: the same programs and output width.
    again = prompts(lengths=(7, 9, 3, 1, 5, 4, 2), seed=5)
    out = generate_many(cfg, params, again, max_new_tokens=[2, 9, 1, 12, 4, 3, 6], temperature=0.9, seed=5,
                        prompt_width=32, **kw)  # fmt: skip
    assert compile_count() == m and out.sequences.shape == (7, 32 + NEW)
    with pytest.raises(ValueError, match="prompt_width"):
        generate_many(cfg, params, ps, max_new_tokens=2, prompt_width=16)
    with pytest.raises(ValueError, match="prefill_rows"):
        generate_many(cfg, params, ps, max_new_tokens=2, slots=2, prefill_rows=3)


def test_sharded_grouped_prefill_and_layer_scan(model):
    """On a data x fsdp mesh (the 4 slots split over both), prompts prefilled two at a time (the last
    group padded with a dummy row), through the stacked layer scan: greedy as before."""
    cfg, params, path = model
    sharder = Sharder(make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4]))
    _, sharded = aj.load_pretrained(path, dtype="float32", sharder=sharder)
    ps = prompts()
    ref = aj.generate(cfg, params, ps, max_new_tokens=NEW, eos_id=EOS)
    out = generate_many(cfg, sharded, ps, max_new_tokens=NEW, eos_id=EOS, slots=4, chunk=4, prefill_rows=2,
                        sharder=sharder, unstack_layers=False)  # fmt: skip
    assert_same(out, ref)
