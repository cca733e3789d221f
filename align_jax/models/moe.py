"""A mixture-of-experts SwiGLU MLP (Qwen3-MoE, Mixtral) with sparse, dropless dispatch.

Routing follows transformers' Qwen3MoeTopKRouter / MixtralTopKRouter cast for cast: router logits in the
compute dtype, a float32 softmax over all experts, top-k, optional renormalisation of the k probabilities
(`norm_topk_prob`; Mixtral always renormalises), the k weights cast back to the compute dtype, and the
weighted sum of the k experts' SwiGLU outputs. Router jitter (Mixtral's `router_jitter_noise`) is not built.

`cfg.moe_impl` picks how the experts run:
- "ragged" ("auto"): sparse. The T*k (token, expert) assignments are sorted by expert, the token rows
  gathered in that order, the three projections run as grouped matmuls (one weight matrix per run of rows)
  and each token sums its k rows back. Every assignment is computed (no capacity, nothing dropped), so it
  equals "dense" up to float rounding, and the expert work is ~T*k rows, not T*E.
- "dense": every expert on every token, weighted by the (mostly zero) routing weights: the plain reference.

The grouped matmul (`grouped_matmul`): `jax.lax.ragged_dot` is a true grouped matmul only on TPU. On CPU,
jax 0.10 lowers it to a masked product over all groups ([X, rows, K] broadcast, then one dot): X times the
expert work, worse than "dense"; GPU builds reportedly expand it the same way. So off TPU the runs of
rows are padded to a multiple of a block size b and each block of b rows is multiplied by its expert's
gathered weight matrix, one batched matmul: at most T*k + X*(b-1) rows, b sized so padding stays < 1/4.

The load-balancing loss is the Switch/Mixtral one, X * sum_e f_e * P_e over the real (unmasked) tokens:
f_e = (top-k assignments to e) / tokens and P_e = mean router probability of e. As in transformers, f sums
to k (a uniform router scores k, not 1). transformers pools every layer's router logits before computing
it; this returns one layer's loss for the caller to average over layers. That is not the same number for
more than one layer (a mean of products, not a product of means): transformers adds expert e of layer 1 to
expert e of layer 2, which are unrelated experts. It is unscaled: the caller applies router_aux_loss_coef.

Sharding: routing and the "dense" path are einsums on [B, T, ...] that GSPMD partitions like the dense
Mlp (top-k is a sort, which it splits over batch shards; lax.top_k it would gather). Sorting tokens by
expert cannot be split along the sorted axis, so the sparse path dispatches within G groups, one per
batch shard (the mesh axes "activation_batch" resolves to), vmapped and sharded on those axes: each device
sorts only its own tokens, and no token crosses devices. Expert weights are stored sharded on "expert"
(and "embed" / "mlp" as the rules say). With "blocks" the expert compute is not expert-parallel: the
experts are all-gathered over "expert" once per layer (FSDP-style) and every device runs every expert its
own tokens picked. With "ragged_dot", GSPMD (as compiled on CPU) splits the grouped matmuls over the
"expert" shards and all-reduces their [rows, F] and [rows, E] outputs. Either way, devices that differ
only along axes the batch is not split over (e.g. "expert") hold the same tokens: map "activation_batch"
onto "expert" too to split tokens there. True expert parallelism (tokens all-to-all to their experts'
devices: shard_map + ragged_all_to_all) is not built.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from align_jax.models.config import ModelConfig
from align_jax.models.layers import BTE, LinearWeights, _normal, _param, activation, dense_kernel
from align_jax.sharding import Sharder

GROUPED_IMPLS = ("auto", "ragged_dot", "blocks")


class Routing(NamedTuple):
    probs_BTX: jax.Array  # float32 softmax over all experts
    weight_BTK: jax.Array  # the k chosen experts' weights, in the compute dtype
    expert_BTK: jax.Array  # the k chosen experts (int32), most probable first


def route(logits_BTX: jax.Array, k: int, norm_topk_prob: bool, dtype: jnp.dtype) -> Routing:
    """transformers' top-k router from the logits (in the compute dtype, as transformers leaves them)."""
    probs = jax.nn.softmax(logits_BTX.astype(jnp.float32), axis=-1)
    # A sort, not lax.top_k: GSPMD does not split the TopK custom call over batch shards (it gathers the
    # whole batch's probabilities onto every device), but it does split a sort along the unsorted axes.
    expert = jnp.argsort(probs, axis=-1, stable=True, descending=True)[..., :k]
    top = jnp.take_along_axis(probs, expert, axis=-1)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return Routing(probs, top.astype(dtype), expert.astype(jnp.int32))


def load_balancing_loss(probs_BTX: jax.Array, expert_BTK: jax.Array, token_mask_BT: jax.Array) -> jax.Array:
    """X * sum_e f_e * P_e over the tokens where token_mask_BT is true (see the module docstring); float32.
    The gradient reaches the router through P only (f counts discrete choices), as in Switch."""
    num_experts = probs_BTX.shape[-1]
    mask = token_mask_BT.astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)  # an all-padding batch gives 0, not NaN
    chosen_BTKX = jax.nn.one_hot(expert_BTK, num_experts, dtype=jnp.float32)
    f_X = jnp.einsum("btkx,bt->x", chosen_BTKX, mask) / tokens
    p_X = jnp.einsum("btx,bt->x", probs_BTX.astype(jnp.float32), mask) / tokens
    return num_experts * jnp.sum(f_X * p_X)


def block_rows(num_rows: int, num_experts: int) -> int:
    """Rows per block for the "blocks" grouped matmul: the largest power of two <= rows / (4 * experts), at
    most 512. Padding every expert's run to a multiple of b adds < experts * b <= rows / 4 rows. Larger
    blocks mean fewer weight copies: on CPU the [blocks, E, F] weight gather costs about as much as the
    matmul it feeds, and at the small30m size b = rows / (4X) ran ~15% faster than rows / (8X)."""
    target = max(1, num_rows // (4 * num_experts))
    return min(512, 1 << (target.bit_length() - 1))


class Layout(NamedTuple):
    """Where the A = S*k assignments of one group go: runs of rows by expert, each padded to a multiple of b."""

    row_A: jax.Array  # the row of each assignment (assignment a is token a // k, slot a % k)
    token_R: jax.Array  # the token of each row; S (out of range, so a zero row) for padding
    sizes_X: jax.Array  # rows per expert, padding included
    block_expert_N: jax.Array  # the expert of each block of b rows (trailing unused blocks: the last expert)


def dispatch_layout(expert_SK: jax.Array, num_experts: int, b: int) -> Layout:
    s, k = expert_SK.shape
    a = s * k
    expert_A = expert_SK.reshape(a)
    # sum_e ceil(n_e / b) <= (a + X(b-1)) / b, and <= a: a static bound on the blocks any routing needs.
    num_blocks = min(a, (a + num_experts * (b - 1)) // b)
    order = jnp.argsort(expert_A, stable=True)  # sorted slot -> assignment
    count_X = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    padded_X = (count_X + b - 1) // b * b
    end_X = jnp.cumsum(padded_X)
    sorted_expert = expert_A[order]
    # A sorted slot's rank inside its expert's run, shifted to where that (padded) run starts.
    rank = jnp.arange(a, dtype=jnp.int32) - (jnp.cumsum(count_X) - count_X)[sorted_expert]
    row_A = jnp.zeros(a, jnp.int32).at[order].set((end_X - padded_X)[sorted_expert] + rank)
    token_R = jnp.full(num_blocks * b, s, jnp.int32).at[row_A].set(jnp.arange(a, dtype=jnp.int32) // k)
    starts = jnp.arange(num_blocks, dtype=jnp.int32) * b
    block_expert = jnp.minimum(jnp.searchsorted(end_X, starts, side="right"), num_experts - 1)
    return Layout(row_A, token_R, padded_X, block_expert.astype(jnp.int32))


def grouped_matmul(x_RK: jax.Array, w_XKN: jax.Array, layout: Layout, impl: str) -> jax.Array:
    """Row r times the weight matrix of its expert: [R, K] x [X, K, N] -> [R, N]. Padding rows give 0."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_RK, w_XKN, layout.sizes_X)
    nb = layout.block_expert_N.shape[0]
    x_NBK = x_RK.reshape(nb, x_RK.shape[0] // nb, x_RK.shape[1])
    w_NKN = jnp.take(w_XKN, layout.block_expert_N, axis=0)
    return jnp.einsum("nbk,nkm->nbm", x_NBK, w_NKN).reshape(x_RK.shape[0], w_XKN.shape[2])


def sparse_experts(
    cfg: ModelConfig,
    x_SE: jax.Array,
    weight_SK: jax.Array,
    expert_SK: jax.Array,
    weights: tuple[jax.Array, ...],
    impl: str,
) -> jax.Array:
    """One dispatch group of S tokens: sort the S*k assignments, grouped SwiGLU, each token sums its k rows."""
    gate_XEF, up_XEF, down_XFE = weights
    s, k = expert_SK.shape
    b = 1 if impl == "ragged_dot" else block_rows(s * k, cfg.num_experts)
    layout = dispatch_layout(expert_SK, cfg.num_experts, b)
    x_RE = jnp.take(x_SE, layout.token_R, axis=0, mode="fill", fill_value=0)
    gate = grouped_matmul(x_RE, gate_XEF, layout, impl)
    h_RF = activation(cfg, gate) * grouped_matmul(x_RE, up_XEF, layout, impl)
    y_RE = grouped_matmul(h_RF, down_XFE, layout, impl)
    y_SKE = jnp.take(y_RE, layout.row_A, axis=0).reshape(s, k, y_RE.shape[1])
    return jnp.einsum("ske,sk->se", y_SKE, weight_SK)


def dense_experts(cfg: ModelConfig, x_BTE: jax.Array, r: Routing, weights: tuple[jax.Array, ...]) -> jax.Array:
    """Every expert on every token; the routing weights (zero off the top k) pick the sum."""
    gate_XEF, up_XEF, down_XFE = weights
    combine_BTX = jnp.einsum(
        "btkx,btk->btx", jax.nn.one_hot(r.expert_BTK, cfg.num_experts, dtype=r.weight_BTK.dtype), r.weight_BTK
    )
    gate = jnp.einsum("bte,xef->btxf", x_BTE, gate_XEF)
    h_BTXF = activation(cfg, gate) * jnp.einsum("bte,xef->btxf", x_BTE, up_XEF)
    y_BTXE = jnp.einsum("btxf,xfe->btxe", h_BTXF, down_XFE)
    return jnp.einsum("btxe,btx->bte", y_BTXE, combine_BTX)


def batch_shards(sharder: Sharder, batch: int) -> int:
    """How many devices' worth of batch rows there are: the mesh axes "activation_batch" resolves to."""
    if sharder.mesh is None:
        return 1
    spec = sharder.spec(("activation_batch",), (batch,))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(sharder.mesh.shape[a] for a in axes)


class ExpertWeights(nn.Module):
    """The experts' SwiGLU kernels, stacked on a leading expert axis: gate/up [X, E, F], down [X, F, E]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        cfg = self.cfg
        x, e, f = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        init = _normal(cfg)
        gate = _param(self, "gate_proj", (x, e, f), ("expert", "embed", "mlp"), init)
        up = _param(self, "up_proj", (x, e, f), ("expert", "embed", "mlp"), init)
        down = _param(self, "down_proj", (x, f, e), ("expert", "mlp", "embed"), init)
        return gate, up, down


class MoeMlp(nn.Module):
    """Routed SwiGLU experts. Returns (out_BTE, this layer's load-balancing loss, float32 scalar).

    `grouped` picks the sparse path's grouped matmul: "ragged_dot", "blocks", or "auto" (ragged_dot on TPU,
    where it is a real grouped matmul; blocks elsewhere). See the module docstring."""

    cfg: ModelConfig
    sharder: Sharder
    grouped: str = "auto"

    @nn.compact
    def __call__(self, x_BTE: jax.Array, token_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if self.grouped not in GROUPED_IMPLS:
            raise ValueError(f"grouped={self.grouped!r} is not one of {GROUPED_IMPLS}")
        dtype = cfg.jnp_dtype
        e = x_BTE.shape[-1]
        x_BTE = self.sharder.constrain(x_BTE.astype(dtype), BTE)
        router = LinearWeights(cfg, (e, cfg.num_experts), ("embed", None), name="router")().kernel
        logits_BTX = jnp.einsum("bte,ex->btx", x_BTE, dense_kernel(router, dtype))
        r = route(logits_BTX, cfg.num_experts_per_tok, cfg.norm_topk_prob, dtype)
        aux = load_balancing_loss(r.probs_BTX, r.expert_BTK, token_mask_BT)
        weights = tuple(dense_kernel(w, dtype) for w in ExpertWeights(cfg, name="experts")())

        sparse = cfg.moe_impl != "dense"
        out_BTE = self._sparse(x_BTE, r, weights) if sparse else dense_experts(cfg, x_BTE, r, weights)
        out_BTE = self.sharder.constrain(out_BTE, BTE)
        return checkpoint_name(out_BTE, "mlp_out"), aux

    def _sparse(self, x_BTE: jax.Array, r: Routing, weights: tuple[jax.Array, ...]) -> jax.Array:
        bsz, t, e = x_BTE.shape
        impl = self.grouped
        if impl == "auto":
            impl = "ragged_dot" if jax.default_backend() == "tpu" else "blocks"
        g = batch_shards(self.sharder, bsz)
        group_names = ("activation_batch", None, None)

        def grouped(a: jax.Array) -> jax.Array:  # [B, T, ...] -> [G, B/G * T, ...], G on the batch shards
            return self.sharder.constrain(a.reshape(g, bsz // g * t, a.shape[-1]), group_names)

        x_GSE, weight_GSK, expert_GSK = grouped(x_BTE), grouped(r.weight_BTK), grouped(r.expert_BTK)

        def one(x_SE: jax.Array, weight_SK: jax.Array, expert_SK: jax.Array, ws: tuple[jax.Array, ...]):
            return sparse_experts(self.cfg, x_SE, weight_SK, expert_SK, ws, impl)

        if impl == "blocks":
            # Gathering blocks of expert-sharded weights makes GSPMD mask and all-reduce [blocks, E, F] (about
            # 5x the experts); all-gathering the experts once first moves far less.
            names = (("expert", "embed", "mlp"), ("expert", "embed", "mlp"), ("expert", "mlp", "embed"))
            weights = tuple(self.sharder.constrain(w, (None, *n[1:])) for w, n in zip(weights, names, strict=True))
        if g == 1:
            out_GSE = one(x_GSE[0], weight_GSK[0], expert_GSK[0], weights)[None]
        else:
            # ragged_dot has no vmap rule for an unbatched rhs; broadcasting the weights over the sharded
            # group axis makes each device hold one copy, which is what GSPMD gathers for it anyway.
            batched = impl == "ragged_dot"
            ws = tuple(jnp.broadcast_to(w[None], (g, *w.shape)) for w in weights) if batched else weights
            out_GSE = jax.vmap(one, in_axes=(0, 0, 0, 0 if batched else None))(x_GSE, weight_GSK, expert_GSK, ws)
        out_GSE = self.sharder.constrain(out_GSE, group_names)
        return out_GSE.reshape(bsz, t, e)
