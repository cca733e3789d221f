"""Param trees of a LoRA run, by path: adapters vs base, the frozen base's storage, merged weights.

A LoRA decoder's params are its base's plus `lora_a` / `lora_b` beside each adapted kernel (see
models/layers.py). A run trains the *trainable* tree: every adapter leaf, plus every leaf outside the
`part` that init_from fills (the RM's scalar head, PPO's value model); the rest is the *base*, frozen.
`part` is None when the whole tree is a decoder (SFT, DPO, GRPO), else the key of the decoder inside it
("decoder" for the RM, "policy" for PPO). Trees are nested dicts; any other value is a leaf (arrays,
logical boxes, shardings, NF4 objects).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from align_jax.models.config import LORA_TARGETS
from align_jax.models.nf4 import NF4

ADAPTER_LEAVES = ("lora_a", "lora_b")
# Where each projection's kernel sits below a layer (layers/stack/...), and how many leading kernel
# dims (after the layer axis) it contracts with its input: o_proj's kernel is [N, H, E].
PROJECTIONS = {
    "q_proj": ("attn", 1),
    "k_proj": ("attn", 1),
    "v_proj": ("attn", 1),
    "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1),
    "up_proj": ("mlp", 1),
    "down_proj": ("mlp", 1),
}
assert set(PROJECTIONS) == set(LORA_TARGETS)


def is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTER_LEAVES


def projection_of(path: tuple[str, ...]) -> str | None:
    """The projection a stacked leaf `.../layers/stack/{attn|mlp}/<proj>/<leaf>` belongs to, else None."""
    if len(path) < 5 or path[-5:-3] != ("layers", "stack"):
        return None
    sub, proj = path[-3], path[-2]
    return proj if PROJECTIONS.get(proj, (None,))[0] == sub else None


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """{path: leaf}; empty subtrees vanish."""
    return traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    return traverse_util.unflatten_dict(flat) if flat else {}


def split(tree: Any, part: str | None = None) -> tuple[dict, dict]:
    """(trainable, base): adapters and everything outside `part` vs the rest of `part` (its subtree,
    without the `part` key)."""
    trainable, base = {}, {}
    for path, leaf in flatten(tree).items():
        inside = part is None or path[0] == part
        if inside and not is_adapter(path):
            base[path if part is None else path[1:]] = leaf
        else:
            trainable[path] = leaf
    return unflatten(trainable), unflatten(base)


def merge(trainable: Any, base: Any, part: str | None = None) -> dict:
    """The full params tree from its two halves (a new dict holding the same leaves: nothing is copied)."""
    flat = dict(flatten(trainable))
    flat.update({path if part is None else (part, *path): leaf for path, leaf in flatten(base).items()})
    return unflatten(flat)


def has_adapters(tree: Any) -> bool:
    return any(is_adapter(path) for path in flatten(tree))


def select(tree: Any, like: Any) -> dict:
    """The leaves of `tree` at the paths `like` has (init_from may hold more: an LM head the RM drops)."""
    flat, want = flatten(tree), flatten(like)
    missing = sorted("/".join(p) for p in want if p not in flat)
    if missing:
        raise KeyError(f"params lack {missing[:5]}")
    return unflatten({p: flat[p] for p in want})


# -- the frozen base's storage ----------------------------------------------------------------------------


def quantizable(path: tuple[str, ...]) -> bool:
    """A projection kernel of the layer stack: what QLoRA stores in NF4 (all seven projections, adapted
    or not, as bitsandbytes' 4-bit loading does; embeddings, norms, biases and the LM head stay)."""
    return path[-1] == "kernel" and projection_of(path) is not None


def frozen_dtype(path: tuple[str, ...], dtype: Any, param_dtype: Any, compute_dtype: Any) -> Any:
    """The dtype a frozen leaf is kept in. Kernels and embeddings are only ever read cast to the compute
    dtype (layers.dense_kernel, the LM head, the embedding lookup), so storing them in it changes no
    number and halves a bf16-compute run's base; norms and biases keep the param dtype (Gemma reads its
    norm scales in float32)."""
    narrower = np.dtype(compute_dtype).itemsize < np.dtype(param_dtype).itemsize
    if narrower and path[-1] in ("kernel", "embedding") and np.dtype(dtype) == np.dtype(param_dtype):
        return np.dtype(compute_dtype)
    return dtype


def frozen_base(base: Any, *, quantize: str, block_size: int, param_dtype: Any, compute_dtype: Any) -> dict:
    """The base as the run keeps it: NF4 projection kernels with `quantize="nf4"`, the other kernels and
    embeddings in the compute dtype. Pure: jit it with the frozen shardings as out_shardings."""
    out = {}
    for path, w in flatten(base).items():
        if quantize == "nf4" and quantizable(path):
            # One layer at a time (stacked kernels are [L, ...]): the float32 intermediates of the whole
            # stack would be L times larger.
            out[path] = jax.lax.map(lambda x: NF4.quantize(x, block_size, compute_dtype), w)
        else:
            out[path] = w.astype(frozen_dtype(path, w.dtype, param_dtype, compute_dtype))
    return unflatten(out)


def dequantized(base: Any, dtype: Any) -> dict:
    """The base with NF4 leaves expanded to `dtype` (what the trained model's forward saw)."""
    return jax.tree.map(
        lambda x: x.dequantize(dtype) if isinstance(x, NF4) else x, base, is_leaf=lambda x: isinstance(x, NF4)
    )


# -- merged weights ---------------------------------------------------------------------------------------


def adapter_delta(a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
    """scale x A B in the kernel's layout: A [L, in..., r] (n_in input dims), B [L, r, out...] ->
    [L, in..., out...], contracted per layer in float32."""
    lead, ins, outs = a.shape[:1], a.shape[1 : 1 + n_in], b.shape[2:]
    a2 = a.reshape(*lead, int(np.prod(ins)), a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*lead, b.shape[1], int(np.prod(outs))).astype(jnp.float32)
    return (jnp.einsum("lir,lro->lio", a2, b2) * scale).reshape(*lead, *ins, *outs)


def merged_weights(trainable: Any, base: Any, *, scale: float, dtype: Any, part: str | None = None) -> dict:
    """The full tree with every adapted kernel replaced by W + scale x A B (adapters dropped): a plain
    decoder of the base architecture. NF4 kernels are dequantised to `dtype` first."""
    full = flatten(merge(trainable, base, part))
    out = {}
    for path, leaf in full.items():
        if is_adapter(path):
            continue
        if isinstance(leaf, NF4):
            leaf = leaf.dequantize(dtype)
        a = full.get((*path[:-1], "lora_a"))
        if path[-1] == "kernel" and a is not None:
            n_in = PROJECTIONS[projection_of(path)][1]
            delta = adapter_delta(a, full[(*path[:-1], "lora_b")], n_in, scale)
            leaf = (leaf.astype(jnp.float32) + delta).astype(leaf.dtype)
        out[path] = leaf
    return unflatten(out)


def adapters_of(tree: Any) -> dict:
    """The adapter leaves of a tree, at their paths."""
    return unflatten({p: v for p, v in flatten(tree).items() if is_adapter(p)})


def adapter_shapes(kernel_shape: tuple[int, ...], n_in: int, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_a, lora_b) shapes of a stacked kernel [L, in..., out...]."""
    lead, ins, outs = kernel_shape[:1], kernel_shape[1 : 1 + n_in], kernel_shape[1 + n_in :]
    return (*lead, *ins, rank), (*lead, rank, *outs)


def adapters_like(base: Any, rank: int, targets: tuple[str, ...], dtype: Any) -> dict:
    """ShapeDtypeStructs of the adapters a LoRA model of `base` (abstract or concrete) has, in `dtype`."""
    out = {}
    for path, leaf in flatten(base).items():
        proj = projection_of(path)
        if path[-1] != "kernel" or proj not in targets:
            continue
        a, b = adapter_shapes(tuple(leaf.shape), PROJECTIONS[proj][1], rank)
        out[(*path[:-1], "lora_a")] = jax.ShapeDtypeStruct(a, dtype)
        out[(*path[:-1], "lora_b")] = jax.ShapeDtypeStruct(b, dtype)
    return unflatten(out)


def nbytes(tree: Any) -> int:
    """Bytes of a tree's arrays (abstract or concrete; NF4 leaves count codes + scales)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
