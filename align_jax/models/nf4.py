"""NF4: the QLoRA paper's 4-bit NormalFloat storage for frozen weights (Dettmers et al. 2023).

A weight is cut into blocks of `block_size` consecutive values along its last axis; each block is
divided by its absolute maximum (kept in float32) and every value is stored as the index of the nearest
of 16 NormalFloat levels (the quantiles of a standard normal, scaled to [-1, 1], with an exact 0). Two
indices share a byte, so a weight costs 4 bits plus 32 / block_size bits of scale (4.5 bits at 64).

The scales are NOT double-quantised (QLoRA quantises them again to 8 bits, saving ~0.37 bit per
weight): kept in float32 they add no error of their own, and the bound below is exact.

Error bound: a value is off by at most half the widest gap between adjacent levels (that of -1 and
-0.696, so 0.152) times its block's absmax.

Blocks run along the last axis only, so every leading axis survives: a layer-stacked kernel [L, ...]
quantises to codes [L, ..., P/2] and scales [L, ..., P/block], which the layer scan slices and
`nn.map_variables` reshapes like any other param, and which shard like the kernel on its leading axes.
A last axis that the block does not divide is zero-padded to a whole block (P); `dequantize` drops the
padding again.

In a params tree an NF4 leaf is read by the model like the array it stands for: it is a Flax box whose
content is the dequantised array (see `NF4`), so the modules need no quantisation code of their own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

# The 16 NF4 levels (bitsandbytes' table, as the QLoRA paper defines them).
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Value v (already divided by its block's absmax) rounds to level i where MIDPOINTS[i-1] < v <= MIDPOINTS[i].
MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)
DEFAULT_BLOCK_SIZE = 64


class NF4(struct.PyTreeNode, meta.AxisMetadata):
    """A quantised array. `codes` uint8 [..., P/2] (low nibble = even position), `scales` float32
    [..., P/block_size]; `dim` is the last axis' true length (P is it rounded up to a whole block).

    A pytree whose leaves are the two arrays, so it can sit in a params tree, be sharded, scanned over
    layers (the scan and `nn.map_variables` slice and reshape the leaves) and passed through jit. It is
    also a Flax box (`AxisMetadata`) whose content is the dense array in `dtype`: a module's
    `self.param(...)` unboxes it, so the layer that reads the kernel dequantises it there, one layer at a
    time inside the layer scan, and Flax's check of the param's shape sees the dense shape."""

    codes: jax.Array
    scales: jax.Array
    dim: int = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False, default="float32")  # what unboxing dequantises to

    @classmethod
    def quantize(cls, w: Any, block_size: int = DEFAULT_BLOCK_SIZE, dtype: Any = None) -> NF4:
        """Blockwise absmax NF4 of `w` (any float dtype, at least 1-D); `dtype` (default: w's) is what the
        model reads it as."""
        check_block_size(block_size)
        w = jnp.asarray(w)
        if w.ndim == 0:
            raise ValueError("NF4.quantize needs an array with at least one axis (blocks run along the last)")
        d = w.shape[-1]
        pad = -d % block_size
        x = w.astype(jnp.float32)
        if pad:
            x = jnp.pad(x, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
        lead, n_blocks = w.shape[:-1], (d + pad) // block_size
        blocks = x.reshape(*lead, n_blocks, block_size)
        absmax = jnp.max(jnp.abs(blocks), axis=-1)
        # An all-zero block divides by 1: its values are 0 and index the exact-zero level.
        normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
        # Count of midpoints below each value = the nearest level's index; a fused compare-and-sum, so no
        # [..., 16] distance tensor is ever materialised.
        mid = jnp.asarray(MIDPOINTS).reshape((1,) * normed.ndim + (len(MIDPOINTS),))
        index = jnp.sum(normed[..., None] > mid, axis=-1, dtype=jnp.uint8)
        pairs = index.reshape(*lead, (d + pad) // 2, 2)
        codes = pairs[..., 0] | (pairs[..., 1] << 4)
        dtype = np.dtype(dtype or w.dtype).name
        return cls(codes=codes.astype(jnp.uint8), scales=absmax, dim=d, block_size=block_size, dtype=dtype)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The array in `dtype`, shape `self.shape`. Works on any leading axes the codes have (the layer
        scan hands it one layer's slice)."""
        lead = self.codes.shape[:-1]
        padded = self.codes.shape[-1] * 2
        index = jnp.stack([self.codes & 0xF, self.codes >> 4], axis=-1).reshape(*lead, padded)
        levels = jnp.take(jnp.asarray(NF4_LEVELS), index.astype(jnp.int32), axis=0)
        blocks = levels.reshape(*lead, padded // self.block_size, self.block_size) * self.scales[..., None]
        return blocks.reshape(*lead, padded)[..., : self.dim].astype(dtype)

    # -- the Flax box ------------------------------------------------------------------------------------

    def unbox(self) -> jax.Array:
        return self.dequantize(self.dtype)

    def replace_boxed(self, val: Any) -> NF4:
        return NF4.quantize(val, self.block_size, self.dtype)

    def add_axis(self, index: int, params: dict[Any, Any]) -> NF4:
        return self  # no axis names to keep: the scan slices and stacks the leaves themselves

    def remove_axis(self, index: int, params: dict[Any, Any]) -> NF4:
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.dim)

    @property
    def nbytes(self) -> int:
        """Bytes held (codes + scales): also right for abstract (ShapeDtypeStruct) leaves."""
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in (self.codes, self.scales))


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"NF4 block_size must be an even integer >= 2 (two codes per byte), got {block_size!r}")


def error_bound(w: Any, block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Per element, the most NF4 can be off: half the widest gap between levels x the block's absmax."""
    w = jnp.asarray(w, jnp.float32)
    d = w.shape[-1]
    pad = -d % block_size
    x = jnp.pad(jnp.abs(w), [(0, 0)] * (w.ndim - 1) + [(0, pad)])
    absmax = jnp.max(x.reshape(*w.shape[:-1], -1, block_size), axis=-1, keepdims=True)
    per_block = jnp.broadcast_to(absmax, (*w.shape[:-1], (d + pad) // block_size, block_size))
    return MAX_HALF_GAP * per_block.reshape(*w.shape[:-1], d + pad)[..., :d]
