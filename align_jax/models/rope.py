"""Rotary position embeddings (the rotate-half layout that HF Llama / Qwen2 / Mistral use).

Frequencies are computed in float32 exactly as transformers computes them, so positions up to the
context length give the same angles bit for bit, including the `llama3` and `linear` scalings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float32)."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv_freq = inv_freq.astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling[0] == "linear":
        return (inv_freq / np.float32(scaling[1])).astype(np.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    _, factor, low_ff, high_ff, orig_ctx = scaling
    factor, low_ff, high_ff, orig_ctx = (np.float32(v) for v in (factor, low_ff, high_ff, orig_ctx))
    low_wavelen = orig_ctx / low_ff
    high_wavelen = orig_ctx / high_ff
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates q or k by the angle `position * inv_freq`; the angle is float32, the result x's dtype.

    Written on the two halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), which is HF's
    `x * cos + rotate_half(x) * sin` without building the negated, concatenated copy of x (that copy
    and its backward were a visible share of the CPU step)."""
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    cos = jnp.cos(angles_BTF)[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(angles_BTF)[:, :, None, :].astype(x_BTNH.dtype)
    half = x_BTNH.shape[-1] // 2
    x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
