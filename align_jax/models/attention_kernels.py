"""Fused attention kernels that read segment ids [B, T] instead of a dense [B, T, S] mask.

Both compute exactly the mask `attention.make_mask` builds for aligned queries and keys (training,
prefill): query i sees key j iff j <= i, both in the same segment, and (with a window W) i - j < W.
Padding (segment 0) sees only padding, so a packed row equals its sequences run alone.

  splash  TPU: `jax.experimental.pallas.ops.tpu.splash_attention`, a block-sparse flash kernel. Its
          causal (or local, for a sliding window) mask is static: the blocks it masks whole are listed on the
          host when the kernel is built and never visited; segment ids are compared inside each block. GQA runs natively: the MHA kernel
          maps query head h to kv head h // (N // K), so keys and values are never repeated.
  flash   GPU: `jax.experimental.pallas.ops.gpu.attention.mha`, the Pallas Triton flash kernel, causal
          with segment ids. It knows no GQA (keys and values are repeated to N heads; autodiff sums their
          gradients back) and no window (`attention.attention` then runs the reference, see there).

Both have their own backward kernels (custom VJPs). Lengths are padded up to a whole number of blocks
with segment id -1, which no real token has: the padded tail sees only itself and is sliced off.

Interpret mode (`ALIGN_JAX_PALLAS_INTERPRET=1`) runs either kernel's Pallas program with ordinary XLA ops
on any backend: exact, slow, and how the CPU tests check both kernels without a TPU or a GPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from align_jax.sharding import Sharder

INTERPRET_ENV = "ALIGN_JAX_PALLAS_INTERPRET"
# Where each kernel compiles without interpret mode.
KERNEL_BACKENDS = {"splash": "tpu", "flash": "gpu"}

# Splash tiles: segment ids are compared 128 lanes at a time, so blocks are multiples of 128. Larger
# blocks amortise the per-step overhead on TPU; the largest candidate dividing the 128-padded length is
# used, so a length never grows by more than 127 padding positions.
SPLASH_BLOCKS = (512, 256, 128)
# The Triton kernel's query/key tile (its default); lengths are padded to a multiple of it.
FLASH_BLOCK = 128
_PAD_SEGMENT = -1


def pallas_interpret() -> bool:
    """Whether Pallas kernels run in interpret mode (env `ALIGN_JAX_PALLAS_INTERPRET`, read at trace time)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() not in ("", "0", "false", "no")


def unavailable_reason(name: str, backend: str | None = None) -> str | None:
    """Why kernel `name` cannot run on `backend` (default: JAX's), or None when it can."""
    backend = backend or jax.default_backend()
    want = KERNEL_BACKENDS[name]
    if backend == want or pallas_interpret():
        return None
    return (
        f"the {name} kernel compiles only on {want.upper()} and this backend is {backend}: run on a "
        f"{want.upper()}, or set {INTERPRET_ENV}=1 (Pallas interpret mode: exact but slow, for tests)"
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_block(length: int, max_block: int = SPLASH_BLOCKS[0]) -> tuple[int, int]:
    """(block size, padded length) for a splash call over `length` positions."""
    padded = _round_up(length, 128)
    block = next(b for b in SPLASH_BLOCKS if b <= max_block and padded % b == 0)
    return block, padded


def _pad_length(x: jax.Array, length: int, value: int = 0) -> jax.Array:
    """Pads axis 1 (the sequence axis of [B, T, ...] arrays) up to `length`."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _splash_kernel(num_heads: int, length: int, window: int | None, block: int, interpret: bool):
    """The splash kernel for one (heads, length, window, block) shape. Building it turns the static mask
    into block-sparsity tables; JAX caches that host-side (numpy) work per mask and block shape, so a
    rebuild per trace is cheap. The kernel itself is not cached: it holds the tables as arrays of the
    trace that built it, which must not leak into another."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if window is None or window >= length:
        head_mask = sa.CausalMask(shape)
    else:
        # LocalMask keeps j in [i - left, i + right]; left = W - 1 and right = 0 is "causal, i - j < W".
        head_mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        # One backward kernel computes dq beside dk/dv: one pass over the blocks instead of two.
        use_fused_bwd_kernel=True,
    )
    mask = sa.MultiHeadMask([head_mask] * num_heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    interpret: bool = False,
    max_block: int = SPLASH_BLOCKS[0],
) -> jax.Array:
    """Segment-aware causal attention through the TPU splash kernel; [B, T, N, H] like q.

    The kernel applies no softmax scale, so q is scaled first, in float32 and rounded once (a bf16 scale
    such as 128 ** -0.5 would itself be rounded and bias every logit). Any head_dim works: the kernel
    tiles the head axis in 128-lane pieces and trims the last."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t, n = q_BTNH.shape[1:3]
    block, padded = splash_block(t, max_block)
    q_BTNH = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    # Splash works per batch element on head-major [N, T, H] arrays, vmapped over the batch.
    q_BNTH, k_BKTH, v_BKTH = (_pad_length(x, padded).transpose(0, 2, 1, 3) for x in (q_BTNH, k_BTKH, v_BTKH))
    seg_BT = _pad_length(segment_ids_BT.astype(jnp.int32), padded, _PAD_SEGMENT)
    kernel = _splash_kernel(n, padded, sliding_window, block, interpret)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKTH, v_BKTH, sa.SegmentIds(q=seg_BT, kv=seg_BT))
    return out_BNTH.transpose(0, 2, 1, 3)[:, :t].astype(q_BTNH.dtype)


def flash_attention(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Segment-aware causal attention through the Pallas GPU (Triton) flash kernel; no sliding window.

    The kernel pads head_dim to a power of two itself (masked loads), so any head_dim >= 16 works."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    t, n = q_BTNH.shape[1:3]
    group = n // k_BTKH.shape[2]
    if group > 1:
        # Query head i reads kv head i // group, as in the reference's [K, N // K] head split.
        k_BTKH, v_BTKH = (jnp.repeat(x, group, axis=2) for x in (k_BTKH, v_BTKH))
    padded = _round_up(t, FLASH_BLOCK)
    q, k, v = (_pad_length(x, padded) for x in (q_BTNH, k_BTKH, v_BTKH))
    seg_BT = _pad_length(segment_ids_BT.astype(jnp.int32), padded, _PAD_SEGMENT)
    out = gpu_attention.mha(q, k, v, seg_BT, sm_scale=scale, causal=True, interpret=interpret)
    return out[:, :t].astype(q_BTNH.dtype)


def segment_attention(
    name: str,
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    segment_ids_BT: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    sharder: Sharder | None = None,
) -> jax.Array:
    """Runs kernel `name` ("splash" or "flash"), in interpret mode when `ALIGN_JAX_PALLAS_INTERPRET` is set.

    With a `sharder` whose mesh has several devices the kernel runs inside a `shard_map`, one call per
    device on its batch rows and heads: a Pallas call is opaque to GSPMD, which would otherwise gather
    whole q/k/v onto every device around it. The length stays whole (a split length is the Ulysses path's,
    sequence_parallel.py, which calls this per device already)."""
    interpret = pallas_interpret()
    if name == "flash" and sliding_window is not None:
        raise ValueError("the flash kernel has no sliding window; attention() routes windowed calls elsewhere")

    def run(q, k, v, seg):
        if name == "splash":
            return splash_attention(q, k, v, seg, scale=scale, sliding_window=sliding_window, interpret=interpret)
        return flash_attention(q, k, v, seg, scale=scale, interpret=interpret)

    if sharder is None or sharder.mesh is None or sharder.mesh.size == 1:
        return run(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
    q_spec = sharder.spec(("activation_batch", None, "activation_heads", None), q_BTNH.shape)
    kv_spec = sharder.spec(("activation_batch", None, "activation_kv_heads", None), k_BTKH.shape)
    if q_spec[2] != kv_spec[2]:
        # Split alike, each device's query heads find their kv heads on it (N/t heads over K/t: the same
        # N/K group); else (say 2 kv heads on a 4-way axis) the heads stay whole for the kernel.
        q_spec, kv_spec = PartitionSpec(q_spec[0]), PartitionSpec(kv_spec[0])
    sharded = jax.shard_map(
        run,
        mesh=sharder.mesh,
        in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0])),
        out_specs=q_spec,
        # Pallas calls state no varying-axes type for their outputs, which check_vma=True refuses (jax
        # 0.10). Unchecked, the transpose sums the cotangents of operands replicated over an axis (heads
        # kept whole on a tensor axis): correct, one all-reduce more than needed.
        check_vma=False,
    )
    return sharded(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
