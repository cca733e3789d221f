"""k-means (k-means++ init, jitted Lloyd iterations), a two-level hierarchical variant, and diversity
selection: up to m prompts per cluster, nearest its centroid or spread out inside it.

Points are padded to a power-of-two bucket (or a multiple of `block` when larger) with weight 0, so
many calls with different sizes (the sub-clusterings of the hierarchical variant) share a handful of
compilations. Assignment runs over `block` points at a time, so memory is block x k, not N x k.
Distances are Euclidean; on L2-normalised embeddings that ranks like cosine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # [k, E]
    labels: np.ndarray  # [N] int, in 0..k-1
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


def _sq_dist(x_BE, c_KE):
    return (
        jnp.sum(x_BE * x_BE, axis=1, keepdims=True)
        - 2 * jnp.dot(x_BE, c_KE.T, precision=HIGHEST)
        + jnp.sum(c_KE * c_KE, axis=1)[None, :]
    )


def _assign(x_NE, c_KE, block: int):
    def one(x_BE):
        d_BK = jnp.maximum(_sq_dist(x_BE, c_KE), 0)
        return jnp.argmin(d_BK, axis=1), jnp.min(d_BK, axis=1)

    n, e = x_NE.shape
    labels, d2 = jax.lax.map(one, x_NE.reshape(n // block, block, e))
    return labels.reshape(n), d2.reshape(n)


def _plus_plus(x_NE, w_N, key, k: int):
    # k-means++: each new centre is drawn with probability proportional to weight x squared distance to
    # the nearest centre so far. Padding has weight 0, so it is never drawn.
    key, sub = jax.random.split(key)
    first = jax.random.categorical(sub, jnp.log(w_N))
    c_KE = jnp.zeros((k, x_NE.shape[1]), x_NE.dtype).at[0].set(x_NE[first])
    d2_N = jnp.maximum(_sq_dist(x_NE, c_KE[:1])[:, 0], 0)

    def add(i, carry):
        c_KE, d2_N, key = carry
        key, sub = jax.random.split(key)
        p_N = w_N * d2_N
        # All remaining points sit on a centre (k > distinct points): fall back to drawing by weight.
        p_N = jnp.where(jnp.sum(p_N) > 0, p_N, w_N)
        pick = jax.random.categorical(sub, jnp.log(p_N))
        c_KE = c_KE.at[i].set(x_NE[pick])
        d2_N = jnp.minimum(d2_N, jnp.maximum(_sq_dist(x_NE, x_NE[pick][None, :])[:, 0], 0))
        return c_KE, d2_N, key

    c_KE, _, _ = jax.lax.fori_loop(1, k, add, (c_KE, d2_N, key))
    return c_KE


@functools.partial(jax.jit, static_argnames=("k", "iters", "block"))
def _kmeans(x_NE, w_N, key, tol, *, k: int, iters: int, block: int):
    c_KE = _plus_plus(x_NE, w_N, key, k)

    def update(c_KE):
        labels, _ = _assign(x_NE, c_KE, block)
        sums_KE = jax.ops.segment_sum(x_NE * w_N[:, None], labels, num_segments=k)
        counts_K = jax.ops.segment_sum(w_N, labels, num_segments=k)
        # An emptied cluster keeps its centre (k-means++ seeds make this rare on real data).
        return jnp.where(counts_K[:, None] > 0, sums_KE / jnp.maximum(counts_K, 1e-30)[:, None], c_KE)

    def cond(carry):
        _, shift, it = carry
        return (it < iters) & (shift > tol)

    def body(carry):
        c_KE, _, it = carry
        new = update(c_KE)
        return new, jnp.max(jnp.sum((new - c_KE) ** 2, axis=1)), it + 1

    c_KE, _, it = jax.lax.while_loop(cond, body, (c_KE, jnp.float32(jnp.inf), jnp.int32(0)))
    labels, d2 = _assign(x_NE, c_KE, block)
    return c_KE, labels, jnp.sum(d2 * w_N), it


def _padded_size(n: int, block: int) -> tuple[int, int]:
    size = 1 << max(0, (n - 1).bit_length())
    if size <= block:
        return size, size
    return -(-n // block) * block, block


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100, tol: float = 1e-6, block: int = 2048
) -> KMeansResult:
    """Lloyd's k-means on the rows of `x` [N, E], seeded k-means++ init; stops after `iters` steps or
    when no centre moves more than sqrt(tol). k is clipped to N."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"kmeans needs a non-empty [N, E] array, got shape {x.shape}")
    if k <= 0:
        raise ValueError(f"kmeans: k must be positive, got {k}")
    n = len(x)
    k = min(k, n)
    size, blk = _padded_size(n, block)
    xp = np.zeros((size, x.shape[1]), np.float32)
    xp[:n] = x
    w = np.zeros(size, np.float32)
    w[:n] = 1
    c, labels, inertia, it = _kmeans(xp, w, jax.random.key(seed), jnp.float32(tol), k=k, iters=iters, block=blk)
    c, labels, inertia, it = jax.device_get((c, labels, inertia, it))
    return KMeansResult(np.asarray(c), np.asarray(labels)[:n].astype(np.int64), float(inertia), int(it))


def hierarchical_kmeans(x: np.ndarray, ks: Sequence[int], *, seed: int = 0, **kw) -> KMeansResult:
    """k-means with ks[0] clusters, then k-means with ks[1] clusters inside each (and so on for more
    levels). Labels number the leaf clusters 0..L-1 (grouped by parent); centroids are the leaves'.
    Each level balances coarse topics against fine variants better than one flat k of the same total."""
    if not ks:
        raise ValueError("hierarchical_kmeans needs at least one level in ks")
    x = np.asarray(x, np.float32)
    top = kmeans(x, ks[0], seed=seed, **kw)
    if len(ks) == 1:
        return top
    labels = np.zeros(len(x), np.int64)
    centroids: list[np.ndarray] = []
    inertia, iterations = 0.0, top.iterations
    for c in range(len(top.centroids)):
        members = np.flatnonzero(top.labels == c)
        if len(members) == 0:
            continue
        sub = hierarchical_kmeans(x[members], ks[1:], seed=seed * 1_000_003 + c + 1, **kw)
        labels[members] = len(centroids) + sub.labels
        centroids += list(sub.centroids)
        inertia += sub.inertia
        iterations = max(iterations, sub.iterations)
    return KMeansResult(np.stack(centroids), labels, inertia, iterations)


def select_per_cluster(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, per_cluster: int, *, how: str = "nearest"
) -> np.ndarray:
    """Sorted indices of up to `per_cluster` points from every cluster.

    how="nearest": the points closest to the centroid (the cluster's most typical prompts).
    how="spread": the point closest to the centroid, then repeatedly the point farthest from all picked
    so far (farthest-point traversal: the cluster's range, outliers included)."""
    if how not in ("nearest", "spread"):
        raise ValueError(f"select_per_cluster: how={how!r}; expected 'nearest' or 'spread'")
    if per_cluster <= 0:
        raise ValueError(f"per_cluster must be positive, got {per_cluster}")
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    d2 = np.sum((x - centroids[labels]) ** 2, axis=1)
    order = np.lexsort((np.arange(len(x)), d2, labels))  # by cluster, then distance, then index
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    picked: list[np.ndarray] = []
    for s, e in zip(starts, [*starts[1:], len(order)], strict=True):
        members = order[s:e]
        if how == "nearest" or len(members) <= per_cluster:
            picked.append(members[:per_cluster])
            continue
        chosen = [members[0]]
        far = np.sum((x[members] - x[members[0]]) ** 2, axis=1)
        while len(chosen) < per_cluster:
            j = int(np.argmax(far))
            chosen.append(members[j])
            far = np.minimum(far, np.sum((x[members] - x[members[j]]) ** 2, axis=1))
        picked.append(np.asarray(chosen))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
