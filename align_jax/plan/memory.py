"""Per-chip memory: XLA's analysis of a compiled step, the train state's bytes from shapes, and the verdict.

The compiled figures are what the TPU compiler allocated for one chip's program: arguments (the state and
the batch shard), outputs, temporaries (activations, gradients, collectives' buffers) and the outputs that
alias donated arguments (the new state reuses the old state's buffers). Peak = arguments + outputs +
temporaries - aliased, as launch/bench.py reports it. `compile()` succeeds whatever the peak: a step that
needs more than the chip's HBM compiles, then fails to load, so the verdict compares the numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from align_jax.models.config import ModelConfig
from align_jax.models.layers import CACHE_NAMES
from align_jax.sharding import Sharder

GIB = 1 << 30
FITS, DOES_NOT_FIT = "FITS", "DOES NOT FIT"


@dataclasses.dataclass(frozen=True)
class Memory:
    """One chip's bytes in a compiled program."""

    argument: int
    output: int
    temp: int
    alias: int
    code: int

    @classmethod
    def of(cls, compiled: Any) -> Memory:
        m = compiled.memory_analysis()
        if m is None:
            raise RuntimeError("the compiler gave no memory analysis for this program")
        return cls(
            argument=int(m.argument_size_in_bytes),
            output=int(m.output_size_in_bytes),
            temp=int(m.temp_size_in_bytes),
            alias=int(m.alias_size_in_bytes),
            code=int(m.generated_code_size_in_bytes),
        )

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "peak": self.peak}


def verdict(peak_bytes: int, hbm_bytes: int) -> str:
    return FITS if peak_bytes <= hbm_bytes else DOES_NOT_FIT


def per_chip_bytes(tree: Any) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def kv_cache_bytes(cfg: ModelConfig, sharder: Sharder, rows: int, length: int) -> tuple[int, int]:
    """(all chips, one chip) bytes of the sampler's KV cache for `rows` sequences of `length` slots: keys
    and values of every layer in the compute dtype, [L, B, K, S, H], sharded as align_jax/generate.py
    constrains it (batch like the activations, kv heads over `tensor`)."""
    shape = (cfg.num_layers, rows, cfg.num_kv_heads, length, cfg.head_size)
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    total = 2 * math.prod(shape) * itemsize
    shard = sharder.sharding(CACHE_NAMES[-len(shape) :], shape).shard_shape(shape)
    return total, 2 * math.prod(shard) * itemsize


def gib(n: float) -> float:
    return n / GIB
