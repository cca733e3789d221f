"""Segment-aware causal attention.

A query at row index i of segment s sees key j iff j <= i, the key is in segment s, and (with a
sliding window W) i - j < W. Segment 0 is padding: padding tokens see only padding, and no real token
ever sees padding, so a packed row computes exactly what its sequences compute alone. Every query
sees at least itself, so no softmax row is empty and nothing turns into NaN.

Implementations, chosen by `ModelConfig.attention_impl`:
  reference  plain XLA einsums with a float32 softmax; the definition the others are tested against.
             For aligned queries and keys it runs blockwise, skipping key blocks causality masks whole.
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`: the fused GPU kernel; the
             segment/causal/window mask is passed as a boolean mask.
  splash     TPU: the Pallas splash kernel (`attention_kernels`), fed segment ids, not the mask.
  flash      GPU: the Pallas Triton flash kernel, fed segment ids. It has no window: a call with a sliding
             window runs the reference instead (Mistral-style windows on a GPU are cudnn's job).
  auto       splash on a TPU (where the caller vouches for the window, see `attention`); cudnn on a
             GPU for bf16/fp16; else reference.

splash and flash read `segment_ids` [B, T] and know the mask only by its rule, so they serve aligned
queries and keys (training, prefill) and need `sliding_window` to be the call's exact window. Chosen
explicitly, a call they cannot serve (no segment ids, a decode step, a soft-cap) is a ConfigError; under
auto it runs the reference. Off their hardware they run only in Pallas interpret mode
(`ALIGN_JAX_PALLAS_INTERPRET=1`), which is how the CPU tests check them. A kernel registered under the
same name with `register_attention_impl` (dense-mask signature) takes precedence over the built-in one.

KV cache (generation): keys and values of every layer, kv-head-major ([B, K, S, H] per layer: the layout
the score and context dots read without a transposed copy per step), either stacked in one [L, B, K, S, H]
array (for the layer scan) or as a tuple of L arrays (for the unrolled layer list, which then reads each
layer's cache without slicing a copy out of the stack). Prefill writes a layer's keys for the whole prompt;
each decode step writes one slot per layer, in place (the cache is a loop carry, never re-stacked).
Decode queries attend over the cache with `cached_attention`, the reference math in that layout: a few
queries per row are memory-bound, and the fused kernels are built for aligned queries and keys.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from align_jax.models import attention_kernels as kernels
from align_jax.models.config import ConfigError
from align_jax.sharding import Sharder

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


def soft_cap(scores: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping, cap * tanh(x / cap): scores stay in (-cap, cap), smoothly."""
    return scores if cap is None else cap * jnp.tanh(scores / cap)


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, softcap: float | None = None) -> jax.Array:
    """Grouped-query attention with a float32 softmax."""
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, softcap)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out.reshape(b, t, n, h)


def init_cache(
    num_layers: int, batch: int, length: int, num_kv_heads: int, head_dim: int, dtype, stacked: bool = True
) -> dict:
    """Zeroed keys and values for `length` slots of every layer: {"k", "v"}, each one [L, B, K, S, H]
    array (`stacked`) or a tuple of L [B, K, S, H] arrays. Either way `cache["k"][layer]` is a layer's keys."""
    shape = (batch, num_kv_heads, length, head_dim)
    if stacked:
        return {"k": jnp.zeros((num_layers, *shape), dtype), "v": jnp.zeros((num_layers, *shape), dtype)}
    return {name: tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)) for name in ("k", "v")}


def write_cache(cache, new_BTKH: jax.Array, layer, index: jax.Array):
    """Writes `new` into layer `layer` at slots [index, index + T) (in place inside a loop). `cache` is
    stacked [L, B, K, S, H] (any `layer`) or a tuple of per-layer arrays (`layer` a Python int)."""
    zero = jnp.zeros((), jnp.int32)
    new_BKTH = new_BTKH.transpose(0, 2, 1, 3)
    start = (zero, zero, jnp.asarray(index, jnp.int32), zero)
    if isinstance(cache, tuple):
        one = jax.lax.dynamic_update_slice(cache[layer], new_BKTH.astype(cache[layer].dtype), start)
        return (*cache[:layer], one, *cache[layer + 1 :])
    return jax.lax.dynamic_update_slice(
        cache, new_BKTH[None].astype(cache.dtype), (jnp.asarray(layer, jnp.int32), *start)
    )


def cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, scale: float, softcap: float | None = None) -> jax.Array:
    """`reference_attention` over keys and values in the cache's kv-head-major layout."""
    b, t, n, h = q_BTNH.shape
    kv = k_BKSH.shape[1]
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgth,bksh->bkgts", q_BKGTH, k_BKSH, preferred_element_type=jnp.float32) * scale
    scores = soft_cap(scores, softcap)
    scores = jnp.where(mask_BTS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out_BKGTH = jnp.einsum("bkgts,bksh->bkgth", probs, v_BKSH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def causal_block_size(length: int) -> int | None:
    """Query-block size for `blocked_causal_attention`: at most 8 blocks (each a separate einsum,
    unrolled in the layer body, so compile time stays bounded) of at least 64 queries. Smaller blocks
    skip more masked keys but cost more ops (and more pad/add work in the backward pass): on a 2-core
    CPU, fwd+bwd of one layer is fastest at 64-query blocks for both 256 and 512 positions."""
    if length < 128:
        return None
    block = max(64, length // 8)
    return block if length % block == 0 else None


def blocked_causal_attention(
    q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, sliding_window: int | None = None, softcap: float | None = None
):
    """The reference attention, one block of queries at a time, each over only the keys it can see:
    the block's causal prefix, trimmed at the front by the sliding window. Same numbers, about half
    the score FLOPs, a block-sized score buffer, ~3x faster on CPU. q/k/v are moved to head-major
    layout once, so the per-block einsums need no transposes of their own.
    Valid when query i and key i are the same position (training, prefill), as `make_mask` builds."""
    b, t, n, h = q_BTNH.shape
    block = causal_block_size(t)
    if block is None or k_BSKH.shape[1] != t:
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, softcap)
    kv = k_BSKH.shape[2]
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    outs = []
    for start in range(0, t, block):
        end = start + block
        first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
        scores = jnp.einsum(
            "bkgth,bksh->bkgts",
            q_BKGTH[:, :, :, start:end],
            k_BKSH[:, :, first:end],
            preferred_element_type=jnp.float32,
        )
        scores = soft_cap(scores * scale, softcap)
        scores = jnp.where(mask_BTS[:, None, None, start:end, first:end], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
        outs.append(jnp.einsum("bkgts,bksh->bkgth", probs, v_BKSH[:, :, first:end]))
    out_BKGTH = jnp.concatenate(outs, axis=3)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def fused_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float, implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with our mask. `implementation="xla"` runs the same call on any
    backend, which is how the CPU tests check the mask plumbing of the cuDNN path."""
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None, :, :], scale=scale, implementation=implementation
    )


register_attention_impl("reference", reference_attention)
register_attention_impl("cudnn", fused_attention)


# auto keeps cuDNN on a GPU, as before the flash kernel existed: the two are unmeasured against each
# other (no GPU was at hand). cuDNN takes any mask (windows too) and runs GQA without copying kv heads;
# on packed rows it pays for reading the mask as a [B, 1, T, S] bias and, knowing only a mask, for the
# fully masked blocks above the diagonal. flash reads O(T) segment ids and skips those blocks, but copies
# kv heads and has no window. Choose flash explicitly for long packed rows; measure before defaulting.
def resolve_impl(name: str, dtype: jnp.dtype) -> str:
    """The implementation `name` ("auto" or an explicit one) runs here; ConfigError if it cannot."""
    backend = jax.default_backend()
    if name == "auto":
        if backend == "tpu":
            return "splash"
        return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "reference"
    if name in _IMPLS:
        return name
    if name in kernels.KERNEL_BACKENDS:
        reason = kernels.unavailable_reason(name, backend)
        if reason is not None:
            raise ConfigError(
                f"attention_impl={name!r}: {reason}; or plug in a kernel of your own with "
                f"align_jax.models.attention.register_attention_impl({name!r}, fn)"
            )
        return name
    raise ConfigError(
        f"attention_impl={name!r} has no kernel registered here (registered: {sorted(_IMPLS)}). "
        "The TPU splash kernel plugs in with align_jax.models.attention.register_attention_impl('splash', fn)."
    )


def _segment_kernel_problem(q_BTNH, k_BSKH, aligned: bool, softcap: float | None, segment_ids) -> str | None:
    """Why a segment-id kernel cannot serve this call, or None when it can."""
    if not aligned or q_BTNH.shape[1] != k_BSKH.shape[1]:
        return "needs aligned queries and keys (training, prefill), not a decode step over a cache"
    if segment_ids is None:
        return "reads segment ids, and this call passed none"
    if segment_ids.shape != q_BTNH.shape[:2]:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}, queries {q_BTNH.shape[:2]}: they must match")
    if softcap is not None:
        return "cannot soft-cap attention scores; use auto or reference"
    return None


def attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    mask_BTS,
    *,
    impl: str = "auto",
    aligned: bool = False,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    segment_ids: jax.Array | None = None,
    exact_window: bool = False,
    sharder: Sharder | None = None,
) -> jax.Array:
    """`aligned`: query i and key i are the same position (no cache offset), so the reference path
    may skip the key blocks that causality masks whole. `scale` defaults to head_dim ** -0.5.
    With `softcap` (Gemma 2) the fused kernels, which cannot cap scores, give way to the reference.
    `segment_ids` [B, T] (training and prefill, with `aligned`): what segment-id kernels read instead of
    the dense mask; the reference path ignores them (`mask_BTS` was built from them).
    `sliding_window` is a bound for the reference (it skips keys beyond it) but the rule itself for the
    segment-id kernels; `exact_window` says it is exactly this call's window (not so for layers that differ
    in kind, which all get the full-attention value), and only then may `auto` pick such a kernel.
    An explicit splash/flash trusts it: ModelConfig refuses them for models whose layers differ.
    `sharder` (outside a shard_map): the segment-id kernels then run per device on its rows and heads."""
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    name = resolve_impl(impl, q_BTNH.dtype)
    if name in kernels.KERNEL_BACKENDS and name not in _IMPLS:
        problem = _segment_kernel_problem(q_BTNH, k_BSKH, aligned, softcap, segment_ids)
        if impl == "auto" and (problem is not None or not exact_window):
            name = "reference"
        elif problem is not None:
            raise ConfigError(f"attention_impl={name!r} {problem}")
        elif name == "flash" and sliding_window is not None:
            name = "reference"  # the Triton kernel has no window; the reference's mask has it
        else:
            return kernels.segment_attention(
                name, q_BTNH, k_BSKH, v_BSKH, segment_ids, scale=scale, sliding_window=sliding_window, sharder=sharder
            )
    if softcap is not None and impl == "auto":
        name = "reference"
    if name == "reference" and aligned:
        return blocked_causal_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, sliding_window, softcap)
    if name == "reference":
        return reference_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale, softcap)
    if softcap is not None:
        raise ConfigError(f"attention_impl={name!r} cannot soft-cap attention scores; use auto or reference")
    return _IMPLS[name](q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale)
