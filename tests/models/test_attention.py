"""Attention invariants: packing is exact, causality and segment isolation hold, and every
implementation gives the reference's numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import align_jax as aj
from align_jax.models import attention as attn
from align_jax.models.transformer import Decoder, default_positions

CFG = aj.ModelConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, dtype="float32"
)


def packed_row(lengths, row_len, seed=0):
    """Random sequences of `lengths`, alone and packed into one row of `row_len` (rest is padding)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, CFG.vocab_size, size=n) for n in lengths]
    tokens = np.zeros((1, row_len), np.int32)
    positions = np.zeros((1, row_len), np.int32)
    segments = np.zeros((1, row_len), np.int32)
    at = 0
    for i, s in enumerate(seqs):
        tokens[0, at : at + len(s)] = s
        positions[0, at : at + len(s)] = np.arange(len(s))
        segments[0, at : at + len(s)] = i + 1
        at += len(s)
    return seqs, tokens, positions, segments


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_packed_equals_unpacked(sliding_window):
    cfg = CFG.replace(sliding_window=sliding_window)
    params = aj.init_params(cfg, jax.random.key(0))
    seqs, tokens, positions, segments = packed_row([5, 7, 4], row_len=20)
    packed = np.asarray(aj.forward(cfg, params, tokens, positions, segments))
    at = 0
    for s in seqs:
        alone = np.asarray(aj.forward(cfg, params, s[None]))
        np.testing.assert_allclose(packed[0, at : at + len(s)], alone[0], rtol=1e-5, atol=1e-6)
        at += len(s)


def input_jacobian(cfg, params, tokens, positions, segments):
    """|d logits[t] / d inputs[s]| for every (t, s) of row 0, through the embedding perturbation."""
    model = Decoder(cfg)
    zeros = jnp.zeros((*tokens.shape, cfg.hidden_size), cfg.jnp_dtype)
    probe = jax.random.normal(jax.random.key(1), (cfg.vocab_size,))

    def outputs(pert):
        logits = model.apply({"params": params, "perturbations": {"embedded": pert}}, tokens, positions, segments)
        return logits[0] @ probe  # [T]

    jac = jax.jit(jax.jacrev(outputs))(zeros)  # [T, 1, S, E]
    return np.asarray(jnp.abs(jac[:, 0]).sum(-1))  # [T, S]


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_causal_and_segment_isolated_through_gradients(sliding_window):
    cfg = CFG.replace(sliding_window=sliding_window)
    params = aj.init_params(cfg, jax.random.key(2))
    _, tokens, positions, segments = packed_row([4, 6], row_len=12, seed=3)
    jac = input_jacobian(cfg, params, tokens, positions, segments)
    seg = segments[0]
    t_idx, s_idx = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    allowed = (s_idx <= t_idx) & (seg[t_idx] == seg[s_idx]) & (seg[t_idx] > 0)
    if sliding_window is not None:
        # Two layers: information travels up to 2 * (window - 1) tokens back.
        allowed &= t_idx - s_idx <= 2 * (sliding_window - 1)
    real = seg[t_idx] > 0
    assert np.all(jac[~allowed & real] == 0.0)
    assert np.all(jac[(seg[t_idx] == 0) & (seg[s_idx] > 0)] == 0.0)  # padding queries see no real token
    assert np.all(jac[allowed] > 0.0)  # and every allowed path is really used
    # Padding is never attended to by real tokens, whatever it contains.
    pad_changed = tokens.copy()
    pad_changed[0, 10:] = 5
    a = np.asarray(aj.forward(cfg, params, tokens, positions, segments))
    b = np.asarray(aj.forward(cfg, params, pad_changed, positions, segments))
    np.testing.assert_array_equal(a[0, :10], b[0, :10])


def random_qkv(b=2, t=16, n=4, k=2, h=8, seed=0, dtype=jnp.float32):
    """q, k, v and a 2-segment + padding layout (the layout holds for t=16; longer t use their own)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, t, k, h), dtype)
    v = jax.random.normal(ks[2], (b, t, k, h), dtype)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [0] * 3], b, axis=0), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return q, kk, v, seg, idx


@pytest.mark.parametrize("window", [None, 4])
def test_fused_path_matches_reference(window):
    """The cuDNN path's call (mask plumbing, GQA, scale) run with XLA's backend on CPU."""
    q, k, v, seg, idx = random_qkv()
    mask = attn.make_mask(seg, seg, idx, idx, window)
    ref = attn.reference_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    fused = attn.fused_attention(q, k, v, mask, q.shape[-1] ** -0.5, implementation="xla")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel exists only on a CUDA device")
def test_cudnn_kernel_matches_reference():
    q, k, v, seg, idx = random_qkv(t=128, h=64, dtype=jnp.bfloat16)
    mask = attn.make_mask(seg, seg, idx, idx, None)
    ref = attn.reference_attention(q, k, v, mask, 0.125).astype(jnp.float32)
    got = attn.fused_attention(q, k, v, mask, 0.125, implementation="cudnn").astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-2)


def test_impl_resolution_and_unregistered_kernel():
    assert attn.resolve_impl("auto", jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "reference")
    assert attn.resolve_impl("auto", jnp.float32) == "reference"
    with pytest.raises(aj.ConfigError, match=r"splash.*register_attention_impl"):
        attn.resolve_impl("splash", jnp.bfloat16)


def test_registered_kernel_is_used():
    calls = []

    def spy(q, k, v, mask, scale):
        calls.append(q.shape)
        return attn.reference_attention(q, k, v, mask, scale)

    attn.register_attention_impl("splash", spy)
    try:
        cfg = CFG.replace(attention_impl="splash")
        params = aj.init_params(cfg, jax.random.key(0))
        toks = np.ones((1, 8), np.int32)
        got = aj.forward(cfg, params, toks)
        want = aj.forward(CFG.replace(attention_impl="reference"), params, toks)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert calls  # traced through the registered kernel
    finally:
        del attn._IMPLS["splash"]


def test_forward_rejects_bad_shapes():
    params = aj.init_params(CFG, jax.random.key(0))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        aj.forward(CFG, params, np.ones(8, np.int32))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        aj.forward(CFG, params, np.ones((1, 8), np.int32), segment_ids=np.ones((1, 7), np.int32))
    assert default_positions(jnp.ones((2, 3), jnp.int32)).tolist() == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize(("t", "window"), [(256, None), (256, 40), (192, 7), (80, None)])
def test_blocked_causal_equals_full(t, window):
    """Skipping masked key blocks changes nothing: values and gradients equal the full computation."""
    q, k, v, _, idx = random_qkv(t=t)
    seg = jnp.asarray(np.repeat([np.arange(t) // 37 + 1], 2, axis=0), jnp.int32)
    mask = attn.make_mask(seg, seg, idx, idx, window)
    assert attn.causal_block_size(t) is not None or t == 80  # 80 < 2 blocks of 64: falls back
    scale = q.shape[-1] ** -0.5

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    full = jax.value_and_grad(loss(lambda q, k, v: attn.reference_attention(q, k, v, mask, scale)), argnums=(0, 1, 2))
    blocked = jax.value_and_grad(
        loss(lambda q, k, v: attn.blocked_causal_attention(q, k, v, mask, scale, window)), argnums=(0, 1, 2)
    )
    (l0, g0), (l1, g1) = full(q, k, v), blocked(q, k, v)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
