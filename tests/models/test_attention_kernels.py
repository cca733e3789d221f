"""The segment-id kernels (TPU splash, GPU Pallas flash) give the reference's numbers on packed rows.

They run in Pallas interpret mode here (CPU), which executes the kernels' own block programs (tiling,
online softmax, block skipping, segment comparison, custom backward) with XLA ops. Shapes are tiny, and
the length 200 is no multiple of a block, so the padding path runs too."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import align_jax as aj
from align_jax.models import attention as attn
from align_jax.models import attention_kernels as kernels
from align_jax.sharding import Sharder, make_mesh, normalize_rules

T = 200
# Row 0: three sequences and padding; row 1: two sequences filling the row.
SEGMENTS = np.array([[1] * 50 + [2] * 60 + [3] * 70 + [0] * 20, [4] * 120 + [7] * 80], np.int32)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv(kernels.INTERPRET_ENV, "1")


def packed_qkv(n=4, k=2, h=64, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    b = SEGMENTS.shape[0]
    q = jax.random.normal(ks[0], (b, T, n, h), dtype)
    kk = jax.random.normal(ks[1], (b, T, k, h), dtype)
    v = jax.random.normal(ks[2], (b, T, k, h), dtype)
    return q, kk, v, jnp.asarray(SEGMENTS)


@functools.partial(jax.jit, static_argnums=(4, 5))
def reference(q, k, v, seg, window, scale):
    idx = jnp.broadcast_to(jnp.arange(T)[None], seg.shape)
    return attn.reference_attention(q, k, v, attn.make_mask(seg, seg, idx, idx, window), scale)


def kernel(name, window):
    if name == "flash":
        return lambda q, k, v, seg, scale: kernels.flash_attention(q, k, v, seg, scale=scale, interpret=True)

    def splash(q, k, v, seg, scale):
        # 128-blocks: the padded length 256 is two of them, so block skipping and the sparse tables run.
        return kernels.splash_attention(q, k, v, seg, scale=scale, sliding_window=window, interpret=True, max_block=128)

    return splash


def value_and_grads(fn, q, k, v, seg, scale):
    probe = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

    def loss(q, k, v):
        out = fn(q, k, v, seg, scale)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


CASES = [("splash", 4, 2, None), ("splash", 2, 2, 37), ("flash", 4, 2, None), ("flash", 2, 2, None)]


@pytest.mark.parametrize(("name", "n", "k", "window"), CASES)
def test_kernel_values_and_grads_match_reference_fp32(name, n, k, window):
    q, kk, v, seg = packed_qkv(n, k)
    scale = 0.11  # not head_dim ** -0.5: the kernels must apply the scale they are given
    want, want_grads = value_and_grads(lambda *a: reference(*a[:4], window, a[4]), q, kk, v, seg, scale)
    got, got_grads = value_and_grads(kernel(name, window), q, kk, v, seg, scale)
    errors = [max_err(got, want)] + [max_err(g, w) for g, w in zip(got_grads, want_grads, strict=True)]
    print(f"{name} N={n} K={k} window={window}: max |err| out, dq, dk, dv = {errors}")
    assert errors[0] < 1e-5
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "window"), [("splash", 37), ("flash", None)])
def test_kernel_bf16_matches_reference(name, window):
    q, kk, v, seg = packed_qkv(4, 2, dtype=jnp.bfloat16, seed=1)
    scale = 64**-0.5
    # The float32 reference on the same bf16 inputs: what bf16 rounding inside the kernel costs.
    want = reference(*(x.astype(jnp.float32) for x in (q, kk, v)), seg, window, scale)
    got = jax.jit(kernel(name, window), static_argnums=4)(q, kk, v, seg, scale)
    assert got.dtype == jnp.bfloat16
    err = max_err(got, want)
    print(f"{name} bf16 window={window}: max |err| = {err}")
    assert err < 3e-2


def test_attention_dispatches_to_kernels_and_refuses_what_they_cannot_do(monkeypatch):
    q, kk, v, seg = packed_qkv(4, 2, h=16)
    idx = jnp.broadcast_to(jnp.arange(T)[None], seg.shape)
    calls = []

    def spy(name, q, k, v, seg, *, scale, sliding_window, sharder):
        calls.append((name, sliding_window))
        return reference(q, k, v, seg, sliding_window, scale)

    monkeypatch.setattr(kernels, "segment_attention", spy)
    mask = attn.make_mask(seg, seg, idx, idx, None)
    for impl in ("splash", "flash"):
        attn.attention(q, kk, v, mask, impl=impl, aligned=True, scale=0.25, segment_ids=seg)
        with pytest.raises(aj.ConfigError, match=f"{impl}.*segment ids"):
            attn.attention(q, kk, v, mask, impl=impl, aligned=True, scale=0.25)
        with pytest.raises(aj.ConfigError, match=f"{impl}.*decode"):
            attn.attention(q, kk, v, mask, impl=impl, aligned=False, scale=0.25, segment_ids=seg)
        with pytest.raises(aj.ConfigError, match=f"{impl}.*soft-cap"):
            attn.attention(q, kk, v, mask, impl=impl, aligned=True, scale=0.25, softcap=5.0, segment_ids=seg)
    wmask = attn.make_mask(seg, seg, idx, idx, 9)
    attn.attention(q, kk, v, wmask, impl="splash", aligned=True, sliding_window=9, scale=0.25, segment_ids=seg)
    assert calls == [("splash", None), ("flash", None), ("splash", 9)]
    # flash has no window: the reference runs it, with the window in its mask.
    got = attn.attention(q, kk, v, wmask, impl="flash", aligned=True, sliding_window=9, scale=0.25, segment_ids=seg)
    assert len(calls) == 3 and max_err(got, reference(q, kk, v, seg, 9, 0.25)) < 1e-5
    # auto here (CPU) is the reference, and on a TPU picks splash only where the window is exact.
    attn.attention(q, kk, v, mask, impl="auto", aligned=True, scale=0.25, segment_ids=seg, exact_window=True)
    assert len(calls) == 3


def test_kernels_need_their_hardware_or_interpret_mode(monkeypatch):
    monkeypatch.delenv(kernels.INTERPRET_ENV)
    if jax.default_backend() == "cpu":
        for impl in ("splash", "flash"):
            with pytest.raises(aj.ConfigError, match=f"{impl}.*{kernels.INTERPRET_ENV}=1"):
                attn.resolve_impl(impl, jnp.bfloat16)
    assert kernels.splash_block(200) == (256, 256)
    assert kernels.splash_block(640) == (128, 640)
    assert kernels.splash_block(4096) == (512, 4096)


def test_config_refuses_kernels_for_layers_that_differ():
    cfg = aj.ModelConfig(
        vocab_size=11, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
        sliding_window=4, layer_types=("sliding_attention", "full_attention"),
    )  # fmt: skip
    for impl in ("splash", "flash"):
        with pytest.raises(aj.ConfigError, match=f"attention_impl='{impl}'.*layer_types"):
            cfg.replace(attention_impl=impl)


@pytest.mark.parametrize(("mesh_shape", "k"), [({"data": 2, "tensor": 2, "fsdp": 2}, 2), ({"data": 2, "tensor": 4}, 2)])
def test_sharded_kernel_runs_per_device(mesh_shape, k):
    """Inside a shard_map: batch rows split, heads split when kv heads split alike (else kept whole)."""
    sharder = Sharder(make_mesh(mesh_shape), normalize_rules(None))
    q, kk, v, seg = packed_qkv(4, k, h=16, seed=3)

    def run(q, k, v, seg, scale):
        return kernels.segment_attention("splash", q, k, v, seg, scale=scale, sliding_window=21, sharder=sharder)

    want, want_grads = value_and_grads(lambda *a: reference(*a[:4], 21, a[4]), q, kk, v, seg, 0.3)
    got, got_grads = value_and_grads(run, q, kk, v, seg, 0.3)
    assert max_err(got, want) < 1e-5
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


MODEL = aj.ModelConfig(
    vocab_size=97, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    dtype="float32", sliding_window=45,
)  # fmt: skip


def test_model_with_splash_equals_reference_on_a_packed_batch():
    """Whole decoder, packed batch: same logits and parameter gradients through splash as the reference."""
    cfg = MODEL
    params = aj.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, size=SEGMENTS.shape).astype(np.int32)
    positions = np.zeros_like(SEGMENTS)
    for row, seg in enumerate(SEGMENTS):
        for s in np.unique(seg):
            at = np.flatnonzero(seg == s)
            positions[row, at] = np.arange(len(at))
    probe = jax.random.normal(jax.random.key(1), (*SEGMENTS.shape, cfg.vocab_size))

    def logits_and_grads(impl):
        c = cfg.replace(attention_impl=impl)

        def loss(p):
            logits = aj.forward(c, p, tokens, positions, SEGMENTS)
            return jnp.sum(logits * probe * (SEGMENTS > 0)[..., None]), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    want, want_grads = logits_and_grads("reference")
    got, got_grads = logits_and_grads("splash")
    grad_errors = jax.tree.leaves(jax.tree.map(max_err, got_grads, want_grads))
    print(f"model: max |err| logits = {max_err(got, want)}, param grads = {max(grad_errors)}")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got_grads, want_grads)
