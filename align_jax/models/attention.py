"""Segment-aware causal attention.

A query at row index i of segment s sees key j iff j <= i, the key is in segment s, and (with a
sliding window W) i - j < W. Segment 0 is padding: padding tokens see only padding, and no real token
ever sees padding, so a packed row computes exactly what its sequences compute alone. Every query
sees at least itself, so no softmax row is empty and nothing turns into NaN.

Implementations, chosen by `ModelConfig.attention_impl`:
  reference  plain XLA einsums with a float32 softmax; the definition the others are tested against.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: the fused GPU kernel; the
             segment/causal/window mask is passed as a boolean mask.
  splash     the TPU seam: register a kernel with `register_attention_impl("splash", fn)`.
  auto       cudnn on a GPU for bf16/fp16, else reference.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from align_jax.models.config import ConfigError

# fn(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], mask[B,T,S] bool, scale) -> [B,T,N,H]
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]
_IMPLS: dict[str, AttentionFn] = {}

# Large but finite: exp(-1e30 - max) is exactly 0 in float32, and a finite value keeps gradients finite.
_MASK_VALUE = -1e30


def register_attention_impl(name: str, fn: AttentionFn) -> None:
    """Adds an attention kernel under `name` (e.g. a TPU splash-attention wrapper)."""
    _IMPLS[name] = fn


def make_mask(
    q_segment_ids_BT: jax.Array,
    kv_segment_ids_BS: jax.Array,
    q_index_BT: jax.Array,
    kv_index_BS: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean [B, T, S]: True where the query may attend to the key.

    Indices are row offsets (not RoPE positions): within one packed row segments are contiguous, so
    index order is the causal order."""
    same_segment = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    delta = q_index_BT[:, :, None] - kv_index_BS[:, None, :]
    mask = same_segment & (delta >= 0)
    if sliding_window is not None:
        mask &= delta < sliding_window
    return mask


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float) -> jax.Array:
    """Grouped-query attention with a float32 softmax."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


def fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with our mask. `implementation="xla"` runs the same call on any
    backend, which is how the CPU tests check the mask plumbing of the cuDNN path."""
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None, :, :], scale=scale, implementation=implementation
    )


register_attention_impl("reference", reference_attention)
register_attention_impl("cudnn", fused_attention)


def resolve_impl(name: str, dtype: jnp.dtype) -> str:
    if name == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "reference"
    if name not in _IMPLS:
        raise ConfigError(
            f"attention_impl={name!r} has no kernel registered here (registered: {sorted(_IMPLS)}). "
            "The TPU splash kernel plugs in with align_jax.models.attention.register_attention_impl('splash', fn)."
        )
    return name


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, *, impl: str = "auto") -> jax.Array:
    scale = q_BTNH.shape[-1] ** -0.5
    return _IMPLS[resolve_impl(impl, q_BTNH.dtype)](q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
