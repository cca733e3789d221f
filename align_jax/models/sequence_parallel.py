"""Sequence parallelism for attention: DeepSpeed-Ulysses over the mesh axes `activation_length` maps to.

Everything in a decoder but attention is per token, so with the length (T) of the activations split over
the `sequence` mesh axis (s devices) GSPMD runs it on T/s tokens per device with no communication.
Attention mixes tokens: left to GSPMD it would gather whole sequences of keys and values implicitly.
Ulysses instead trades the split: inside a `jax.shard_map` over the whole mesh, each device holds
q/k/v [B/d, T/s, heads/t, H] (d: the batch axes, t: the tensor axis on heads), and one all-to-all over the
sequence axes turns that into [B/d, T, heads/(t*s), H]: whole sequences for a subset of heads. Ordinary
attention (`align_jax.models.attention.attention`, any kernel) runs there, with the row's full segment
ids (all-gathered: [B/d, T] int32, small), so packed segments and the causal and sliding-window masks are
exact; a second all-to-all returns the context to [B/d, T/s, heads/t, H]. Communication per layer is four
all-to-alls of q/k/v/context-sized arrays (and their transposes in the backward pass), independent of s
per device.

Constraints (checked when the model is traced, with a message saying what to change):
  * num_heads must be divisible by s x t (each device keeps whole heads; t is the tensor axis, when it
    shards the query heads).
  * kv heads: grouped-query models may have fewer kv heads K than s x t. The keys and values are then
    repeated, each kv head r times in place (r = s*t / gcd(K, s*t), the least that makes K*r divisible
    by s*t), before the all-to-all. Repeating in place keeps query head i on kv head i // (N/K), so the
    numbers do not change; the cost is r times the key/value traffic and memory for attention.
  * T must be divisible by s, else the length is not split over the axis at all (the sharding rules are
    shape-aware) and attention runs as without sequence parallelism.

Memory: per device, attention holds q/k/v/context for T positions of heads/(s*t) heads, the same bytes as
the T/s positions of all heads it had before. The reference path masks with a [B/d, T, T] boolean built
here from the gathered segment ids (32k positions: 1 GiB per row if materialised; it is elementwise in
iota and the ids, so XLA can fuse it into the masked scores block by block; not measured at 32k).
Segment-id kernels (splash, flash) take the ids and never build it.

Generation (prefill/decode with a KV cache) does not take this path: its cache is laid out per position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from align_jax.models.attention import attention, make_mask
from align_jax.sharding import Sharder, ShardingError

# The logical names of q/k/v [B, T, heads, H] (kv arrays are resharded to the query heads' axes).
QKV_NAMES = ("activation_batch", "activation_length", "activation_heads", None)


def _axes(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sequence_axes(sharder: Sharder, shape_BT: Sequence[int]) -> tuple[str, ...]:
    """The mesh axes that split the length of [B, T] activations (sizes > 1), or () when none does: then
    attention runs without sequence parallelism. Decoder and Attention both ask this, so they agree on
    whether the dense [B, T, T] masks are needed."""
    if sharder.mesh is None or sharder.mesh.size == 1:
        return ()
    return _axes(sharder.spec(QKV_NAMES[:2], tuple(shape_BT[:2]))[1])


def kv_repeats(num_heads: int, num_kv_heads: int, ways: int) -> int:
    """How many times each kv head is repeated so that both head counts split `ways` ways (the sequence
    degree times the tensor degree on heads). 1 when K already divides."""
    if num_heads % ways:
        raise ShardingError(
            f"Ulysses sequence parallelism splits attention heads over {ways} devices (sequence x tensor "
            f"axes), but num_heads={num_heads} is not divisible by {ways}; use a sequence (or tensor) degree "
            "that divides num_heads, or map activation_length to no mesh axis"
        )
    return ways // math.gcd(num_kv_heads, ways)


def ulysses_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array,
    is_local: Any = False,
    *,
    sharder: Sharder,
    impl: str,
    sliding_window: int | None,
    local_window: int | None = None,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """Segment-aware causal attention [B, T, N, H] with the length split over the mesh (module docstring).

    `sliding_window` is the window of every layer (None: full attention); with layers that differ
    (Gemma), `local_window` is the sliding layers' window and `is_local` (a traced bool inside the layer
    scan) says whether this is one."""
    b, t, n, _ = q_BTNH.shape
    seq = sequence_axes(sharder, (b, t))
    if not seq:
        raise ShardingError(f"ulysses_attention: no mesh axis splits the length {t} of these activations")
    spec = sharder.spec(QKV_NAMES, q_BTNH.shape)
    head_axes = _axes(spec[2])
    mesh = sharder.mesh
    s = math.prod(mesh.shape[a] for a in seq)
    ways = s * math.prod(mesh.shape[a] for a in head_axes)
    r = kv_repeats(n, k_BTKH.shape[2], ways)
    if r > 1:
        k_BTKH, v_BTKH = (jnp.repeat(x, r, axis=2) for x in (k_BTKH, v_BTKH))
    qkv_spec = PartitionSpec(*spec)
    seg_spec = PartitionSpec(spec[0], spec[1])
    axis = seq if len(seq) > 1 else seq[0]

    def local(q, k, v, seg, local_flag):
        # [b, T/s, heads, H] -> [b, T, heads/s, H]: whole sequences for this device's share of the heads.
        q, k, v = (jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True) for x in (q, k, v))
        seg_bT = jax.lax.all_gather(seg, axis, axis=1, tiled=True)
        index_bT = jnp.broadcast_to(jnp.arange(seg_bT.shape[1], dtype=jnp.int32)[None, :], seg_bT.shape)
        mask = make_mask(seg_bT, seg_bT, index_bT, index_bT, sliding_window)
        if local_window is not None:
            local_mask = make_mask(seg_bT, seg_bT, index_bT, index_bT, local_window)
            mask = jnp.where(local_flag, local_mask, mask)
        ctx = attention(
            q,
            k,
            v,
            mask,
            impl=impl,
            aligned=True,
            sliding_window=sliding_window,
            scale=scale,
            softcap=softcap,
            segment_ids=seg_bT,
            # The call's exact window unless layers differ (then `sliding_window` is the full layers'
            # None and the mask carries the local window): only then may auto pick a segment-id kernel.
            exact_window=local_window is None,
        )
        # [b, T, heads/s, H] -> [b, T/s, heads, H]: back to the layout the rest of the layer runs in.
        return jax.lax.all_to_all(ctx, axis, split_axis=1, concat_axis=2, tiled=True)

    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, PartitionSpec()),
        out_specs=qkv_spec,
        # Pallas kernels (splash, flash) carry no rule for shard_map's replication checks. Nothing here
        # needs them: the output is split exactly like q, and the backward pass of an input replicated
        # over an axis the specs do not name (expert, or a batch axis that does not divide B) is tested.
        check_vma=False,
    )
    return run(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, jnp.asarray(is_local, jnp.bool_))
