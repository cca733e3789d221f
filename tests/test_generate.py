"""The sampling engine: greedy parity with transformers, log-probs equal to teacher forcing, per-row
stopping, reproducibility (per row with row_keys), one compilation per shape, and sharded == unsharded.
The refill engine over it is tested in test_engine.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import align_jax as aj
from align_jax.generate import compile_count, prompt_bucket_width
from align_jax.sharding import Sharder, make_mesh
from tests import hf_models

EOS = hf_models.COMMON["eos_token_id"]
VOCAB = hf_models.COMMON["vocab_size"]
# Different lengths in one batch; with 10 new tokens every row outgrows Mistral's window of 5.
PROMPT_LENGTHS = (7, 3, 12)
NEW = 10


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(hf_models.TINY))
def family(request, tmp_path_factory):
    model = hf_models.build(request.param)
    path = hf_models.save(model, tmp_path_factory.mktemp(request.param))
    cfg, params = aj.load_pretrained(path, dtype="float32")
    return request.param, model, path, cfg, params


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    model = hf_models.build("qwen2", seed=1)
    path = hf_models.save(model, tmp_path_factory.mktemp("qwen2_gen"))
    cfg, params = aj.load_pretrained(path, dtype="float32")
    return path, cfg, params


def torch_greedy(model, prompt, new, eos=EOS):
    """transformers' greedy continuation of one prompt alone (it stops at eos)."""
    ids = torch.as_tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def teacher_forced_logprobs(cfg, params, out):
    """log p(completion token i) from one forward pass over prompt + completion."""
    logp = np.asarray(jax.nn.log_softmax(aj.forward(cfg, params, out.sequences), axis=-1))
    ref = np.zeros(out.tokens.shape, np.float32)
    for b in range(out.tokens.shape[0]):
        start, n = int(out.prompt_lengths[b]), int(out.lengths[b])
        for i in range(n):
            ref[b, i] = logp[b, start - 1 + i, out.sequences[b, start + i]]
    return ref


def check_stops(out, eos_ids, pad=0):
    """Each row ends at its first eos (or max_new_tokens); pad and zero log-prob after."""
    tokens, logprobs, lengths = map(np.asarray, (out.tokens, out.logprobs, out.lengths))
    for row, lp, n in zip(tokens, logprobs, lengths, strict=True):
        hits = [i for i, t in enumerate(row[:n]) if t in eos_ids]
        assert hits == ([n - 1] if n < len(row) else hits[:1]), (row, n)
        assert np.all(row[n:] == pad) and np.all(lp[n:] == 0.0) and np.all(lp[:n] < 0.0)


def test_greedy_matches_transformers(family):
    name, model, _, cfg, params = family
    ps = prompts(seed=len(name))
    out = aj.generate(cfg, params, ps, max_new_tokens=NEW, temperature=0.0, eos_id=EOS, seed=0)
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
    for b, p in enumerate(ps):
        ref = torch_greedy(model, p, NEW)
        n = int(out.lengths[b])
        assert n == len(ref) and out.tokens[b, :n].tolist() == ref, (name, b)
        assert out.sequences[b, : len(p) + n].tolist() == p + ref
    check_stops(out, {EOS})
    np.testing.assert_allclose(out.logprobs, teacher_forced_logprobs(cfg, params, out), atol=2e-5)
    if name == "mistral":  # the window (5) is shorter than prompt + completion: it changes the continuation
        wide = aj.generate(cfg.replace(sliding_window=None), params, ps, max_new_tokens=NEW, eos_id=EOS)
        assert not np.array_equal(wide.tokens, out.tokens)


@pytest.mark.parametrize(
    "kw", [dict(temperature=0.7, top_k=20), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3)]
)
def test_sampled_logprobs_equal_teacher_forcing(qwen, kw):
    _, cfg, params = qwen
    out = aj.generate(cfg, params, prompts(seed=3), max_new_tokens=NEW, eos_id=EOS, seed=5, **kw)
    check_stops(out, {EOS})
    # Log-probs under the unmodified model (temperature 1, no filtering), whatever the sampling used.
    np.testing.assert_allclose(out.logprobs, teacher_forced_logprobs(cfg, params, out), atol=2e-5)


def test_top_k_filters_and_long_prompts(qwen):
    """With top_k=3, every sampled token is among the 3 most likely under the model. A 70-token prompt
    (bucket 128) also takes the blocked prefill attention."""
    _, cfg, params = qwen
    ps = prompts(lengths=(70, 5), seed=4)
    out = aj.generate(cfg, params, ps, max_new_tokens=NEW, temperature=2.0, top_k=3, eos_id=(), seed=1)
    assert out.sequences.shape == (2, 128 + NEW)
    logits = np.asarray(aj.forward(cfg, params, out.sequences))
    for b, start in enumerate(np.asarray(out.prompt_lengths)):
        for i in range(NEW):
            top3 = np.argsort(logits[b, start - 1 + i])[-3:]
            assert out.tokens[b, i] in top3
    np.testing.assert_allclose(out.logprobs, teacher_forced_logprobs(cfg, params, out), atol=2e-5)


def test_eos_stops_only_its_row(qwen):
    _, cfg, params = qwen
    ps = prompts(seed=6)
    kw = dict(max_new_tokens=NEW, temperature=1.0, seed=3)  # samples, so rows do not just repeat a token
    free = aj.generate(cfg, params, ps, eos_id=(), **kw)
    assert free.lengths.tolist() == [NEW] * 3
    free = np.asarray(free.tokens)
    # An "eos" that row 0 samples first at some step s, and the other rows never sample.
    s, stop = next((s, int(t)) for s, t in enumerate(free[0]) if s > 0 and t not in free[0, :s] and t not in free[1:])
    out = aj.generate(cfg, params, ps, eos_id={stop}, pad_id=0, **kw)
    assert out.lengths.tolist() == [s + 1, NEW, NEW]
    assert out.tokens[0].tolist() == free[0, : s + 1].tolist() + [0] * (NEW - s - 1)
    np.testing.assert_array_equal(out.tokens[1:], free[1:])
    check_stops(out, {stop})
    seq = np.asarray(out.sequences[0])
    assert seq[: len(ps[0]) + s + 1].tolist() == ps[0] + free[0, : s + 1].tolist()
    assert np.all(seq[len(ps[0]) + s + 1 :] == 0)


def test_seeds_filters_and_one_compilation_per_shape(qwen):
    _, cfg, params = qwen
    ps = prompts(seed=7)

    def sample(seed, ps=ps, **kw):
        kw = {"temperature": 0.8, **kw}
        return np.asarray(aj.generate(cfg, params, ps, max_new_tokens=NEW, eos_id=(), seed=seed, **kw).tokens)

    a = sample(0)
    n = compile_count()
    np.testing.assert_array_equal(a, sample(0))
    assert not np.array_equal(a, sample(1))
    # Other prompts in the same bucket, another temperature, seed, eos id: the same program.
    other = prompts(lengths=(16, 1, 9), seed=8)
    sample(2, ps=other, temperature=1.1)
    aj.generate(cfg, params, other, max_new_tokens=NEW, temperature=0.5, eos_id=EOS, seed=3)
    assert compile_count() == n

    greedy = np.asarray(aj.generate(cfg, params, ps, max_new_tokens=NEW, eos_id=()).tokens)
    np.testing.assert_array_equal(sample(4, top_k=1), greedy)
    np.testing.assert_array_equal(sample(5, top_p=1e-6), greedy)


def test_row_keys_make_rows_independent(qwen):
    """With row_keys a row's samples depend on its index only: other prompts beside it change nothing,
    and the same prompt in two rows (a GRPO group) gets two different samples."""
    _, cfg, params = qwen
    ps = prompts(seed=11)
    kw = dict(max_new_tokens=NEW, temperature=1.0, eos_id=(), seed=3, row_keys=True)
    a = np.asarray(aj.generate(cfg, params, ps, **kw).tokens)
    b = np.asarray(aj.generate(cfg, params, [ps[0], ps[1], ps[0]], **kw).tokens)
    np.testing.assert_array_equal(a[:2], b[:2])
    assert not np.array_equal(b[0], b[2])


def test_padded_array_input_and_layer_scan(qwen):
    _, cfg, params = qwen
    ps = prompts(seed=9)
    ref = aj.generate(cfg, params, ps, max_new_tokens=NEW, temperature=0.9, top_p=0.95, eos_id=EOS, seed=2)
    arr = np.zeros((3, 13), np.int32)  # width 13: padded up to the bucket inside
    for b, p in enumerate(ps):
        arr[b, : len(p)] = p
    out = aj.generate(cfg, params, arr, prompt_lengths=[len(p) for p in ps], max_new_tokens=NEW, temperature=0.9,
                      top_p=0.95, eos_id=EOS, seed=2)  # fmt: skip
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    # The stacked layer scan (what training runs) decodes the same, with one and two layers per unit.
    for k in (1, 2):
        scan_cfg = cfg.replace(layers_per_unit=k, remat_policy="full")
        scanned = aj.generate(scan_cfg, params, ps, max_new_tokens=NEW, temperature=0.9, top_p=0.95, eos_id=EOS,
                              seed=2, unstack_layers=False)  # fmt: skip
        np.testing.assert_array_equal(scanned.tokens, ref.tokens)
        np.testing.assert_allclose(scanned.logprobs, ref.logprobs, atol=1e-6)
    assert prompt_bucket_width(13) == 16 and prompt_bucket_width(17) == 32 and prompt_bucket_width(65, 64) == 128
    with pytest.raises(ValueError, match="at least one token"):
        aj.generate(cfg, params, [[5], []], max_new_tokens=2)


def test_sharded_equals_unsharded(qwen):
    path, cfg, params = qwen
    sharder = Sharder(make_mesh({"data": 2, "fsdp": 4}))
    _, sharded = aj.load_pretrained(path, dtype="float32", sharder=sharder)
    ps = prompts(lengths=(7, 3, 12, 1, 5, 9, 16, 2), seed=10)
    # Sampled with top-k and top-p: the draws, and the forward under them, must not depend on the mesh.
    kw = dict(max_new_tokens=NEW, temperature=0.8, top_k=30, top_p=0.95, eos_id=EOS, seed=4)
    ref = aj.generate(cfg, params, ps, **kw)
    for unstack in (True, False):  # per-layer weights and cache, and the stacked layer scan
        out = aj.generate(cfg, sharded, ps, sharder=sharder, unstack_layers=unstack, **kw)
        assert out.tokens.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
