"""NF4 storage (align_jax/models/nf4.py): error bound, real 4-bit packing, odd shapes, use inside the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.models.nf4 import MAX_HALF_GAP, NF4, NF4_LEVELS, error_bound


def test_levels_are_the_qlora_code_book():
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and 0.0 in NF4_LEVELS
    assert np.all(np.diff(NF4_LEVELS) > 0)
    assert pytest.approx((1.0 - 0.6961928009986877) / 2) == MAX_HALF_GAP


@pytest.mark.parametrize("shape", [(4, 256), (2, 3, 128), (7, 100), (5, 3)])
def test_dequantized_weights_are_within_the_nf4_bound(shape):
    w = jax.random.normal(jax.random.key(0), shape) * 0.05
    q = NF4.quantize(w, 64)
    out = q.dequantize(jnp.float32)
    assert out.shape == w.shape and q.shape == w.shape
    err = np.abs(np.asarray(out) - np.asarray(w))
    bound = np.asarray(error_bound(w, 64))
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)
    # Rounding to the nearest level: the bound is tight somewhere, and most values do much better.
    assert err.max() > 0.3 * bound.max() and err.mean() < 0.5 * bound.mean()
    # Each block's absmax is exact (it maps to +-1).
    d = shape[-1]
    first = np.asarray(w)[..., : min(d, 64)]
    idx = np.abs(first).argmax(axis=-1)
    np.testing.assert_array_equal(
        np.take_along_axis(np.asarray(out)[..., : min(d, 64)], idx[..., None], -1),
        np.take_along_axis(first, idx[..., None], -1),
    )


def test_two_codes_per_byte_and_padding_of_a_ragged_last_axis():
    w = jax.random.normal(jax.random.key(1), (3, 8, 1024), jnp.float32)
    q = NF4.quantize(w, 64)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 8, 512) and q.scales.shape == (3, 8, 16)
    # 4 bits a value + one float32 scale per 64: 4.5 bits, against 32.
    assert q.nbytes == 3 * 8 * (512 + 16 * 4) and q.nbytes / w.nbytes == pytest.approx(4.5 / 32)
    ragged = NF4.quantize(w[..., :100], 64)  # 100 = one block and a zero-padded partial one
    assert ragged.codes.shape == (3, 8, 64) and ragged.scales.shape == (3, 8, 2) and ragged.shape == (3, 8, 100)
    # Whole blocks are the same whatever follows them; the padding never leaks into the values.
    np.testing.assert_array_equal(np.asarray(ragged.dequantize())[..., :64], np.asarray(q.dequantize())[..., :64])
    with pytest.raises(ValueError, match="even integer"):
        NF4.quantize(w, 63)
    with pytest.raises(ValueError, match="at least one axis"):
        NF4.quantize(jnp.float32(1.0))


def test_zero_blocks_and_exact_levels_round_trip():
    levels = jnp.asarray(NF4_LEVELS)
    pad = jnp.zeros((48,))  # each block: the 16 levels times its absmax, then zeros
    w = jnp.concatenate([jnp.zeros((64,)), levels * 2.0, pad, levels[::-1] * 0.5, pad])[None]
    out = NF4.quantize(w, 64).dequantize()
    np.testing.assert_allclose(np.asarray(out), np.asarray(w), rtol=1e-6, atol=0)


def test_leading_axes_slice_like_a_layer_stack():
    """The layer scan hands dequantize one layer's slice of codes and scales; jit and tree ops see two leaves."""
    w = jax.random.normal(jax.random.key(2), (4, 16, 6, 8))
    q = NF4.quantize(w, 16)
    assert len(jax.tree.leaves(q)) == 2
    layer = jax.tree.map(lambda x: x[2], q)
    np.testing.assert_array_equal(np.asarray(layer.dequantize()), np.asarray(q.dequantize())[2])
    stacked = jax.lax.map(lambda x: NF4.quantize(x, 16), w)  # how the frozen base is built, layer by layer
    np.testing.assert_array_equal(np.asarray(stacked.codes), np.asarray(q.codes))
    out = jax.jit(lambda t: t.dequantize(jnp.bfloat16))(q)
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
