"""Model-merging arithmetic, one tensor at a time, in float32 numpy.

Each method maps N fine-tuned tensors (and, for most, the base tensor they were tuned from) to one
merged tensor. Task vectors are `tau_i = theta_i - base`. Weights multiply each model's contribution:
for `linear` they are normalised to sum to 1 (unless normalize=False); everywhere else they are
per-model multipliers of the task vectors (default 1) and are not normalised.

  linear           sum_i w_i theta_i
  task_arithmetic  base + scale * sum_i w_i tau_i
  ties             trim each tau_i to its top-`density` entries by magnitude, elect each entry's sign by
                   the sign of sum_i w_i tau_i (total mass), average the entries that agree (disjoint mean),
                   base + scale * that (Yadav et al. 2023)
  dare_linear      drop each tau_i entry with probability `drop_rate`, rescale survivors by 1/(1-p), then
                   base + scale * sum_i w_i tau_i (Yu et al. 2023)
  dare_ties        the same drop and rescale, then TIES: an optional top-`density` trim (default 1: none,
                   DARE's random drop replaces it), sign election and disjoint mean
  slerp            spherical interpolation between exactly two models at `t` in [0, 1]
  model_stock      t * mean_i(theta_i) + (1 - t) * base with t = N cos / (1 + (N-1) cos), cos the mean
                   pairwise cosine between the task vectors (Jang et al. 2024)

Angle- and magnitude-based statistics (SLERP's angle, Model Stock's cosine, TIES's top-k) are computed per
layer for stacked leaves (`layer_axis=True`: a leading [num_layers] axis), so merging a stacked leaf
equals merging its layers one by one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

METHODS: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock")
# Each method's keyword arguments and their defaults: unknown ones are an error, and the recorded recipe
# of a merge holds every one of them, so an explicit default and an omitted one are the same recipe.
METHOD_KWARGS: dict[str, dict[str, Any]] = {
    "linear": {"normalize": True},
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_linear": {"drop_rate": 0.5, "scale": 1.0, "seed": 0},
    "dare_ties": {"drop_rate": 0.5, "density": 1.0, "scale": 1.0, "seed": 0},
    "slerp": {"t": 0.5},
    "model_stock": {},
}
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock")
# Below this |cos| two SLERP endpoints span a plane; above it sin(angle) is too small to divide by.
SLERP_COLINEAR = 0.9995


def resolve_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` completed with the method's defaults, and checked: names and ranges."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {METHODS}")
    allowed = METHOD_KWARGS[method]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"merge method {method!r} takes no {unknown}; its options are {sorted(allowed) or 'none'}")
    out = {**allowed, **kwargs}
    for key in ("scale", "density", "drop_rate", "t"):
        if key in out:
            try:
                out[key] = float(out[key])
            except (TypeError, ValueError):
                raise ValueError(f"{method}: {key}={out[key]!r} is not a number") from None
            if not math.isfinite(out[key]):
                raise ValueError(f"{method}: {key}={out[key]} is not finite")
    if "density" in out and not 0.0 < out["density"] <= 1.0:
        raise ValueError(f"{method}: density={out['density']} must be in (0, 1] (the kept fraction)")
    if "drop_rate" in out and not 0.0 <= out["drop_rate"] < 1.0:
        raise ValueError(f"{method}: drop_rate={out['drop_rate']} must be in [0, 1)")
    if "t" in out and not 0.0 <= out["t"] <= 1.0:
        raise ValueError(f"{method}: t={out['t']} must be in [0, 1]")
    if "seed" in out:
        if isinstance(out["seed"], bool) or not isinstance(out["seed"], int | np.integer) or out["seed"] < 0:
            raise ValueError(f"{method}: seed={out['seed']!r} must be a non-negative integer")
        out["seed"] = int(out["seed"])
    if "normalize" in out:
        out["normalize"] = bool(out["normalize"])
    return out


def resolve_weights(method: str, weights: Sequence[float] | None, n_models: int) -> list[float] | None:
    """The per-model weights, checked against the number of models (None where a method takes none)."""
    if method in ("slerp", "model_stock"):
        if weights is not None:
            raise ValueError(f"{method} takes no weights (SLERP uses t; Model Stock averages its models equally)")
        return None
    if weights is None:
        return [1.0 / n_models] * n_models if method == "linear" else [1.0] * n_models
    weights = [float(w) for w in weights]
    if len(weights) != n_models:
        raise ValueError(f"{method}: {len(weights)} weights for {n_models} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{method}: weights {weights} must be finite")
    return weights


def check_models(method: str, n_models: int, has_base: bool) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {METHODS}")
    if n_models < 1:
        raise ValueError(f"{method}: no models to merge")
    if method in NEEDS_BASE and not has_base:
        raise ValueError(f"{method} needs a base model (the one the others were fine-tuned from)")
    if method in ("linear", "slerp") and has_base:
        raise ValueError(f"{method} takes no base model; list every model to combine among the models")
    if method == "slerp" and n_models != 2:
        raise ValueError(f"slerp interpolates between exactly 2 models, got {n_models}")
    if method == "model_stock" and n_models < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models besides the base, got {n_models}")


def _name_seed(name: str) -> int:
    # A stable hash (Python's hash() is salted per process): the same tensor draws the same mask in every run.
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def dare(tau: np.ndarray, drop_rate: float, seed: int, name: str, model: int) -> np.ndarray:
    """Drops each entry with probability `drop_rate` and rescales the survivors by 1/(1-drop_rate), so the
    expectation is `tau`. The mask depends only on (seed, tensor name, model index)."""
    if drop_rate == 0.0:
        return tau
    rng = np.random.default_rng([seed, _name_seed(name), model])
    keep = rng.random(tau.shape, dtype=np.float32) >= drop_rate
    return np.where(keep, tau * np.float32(1.0 / (1.0 - drop_rate)), np.float32(0.0))


def trim(tau: np.ndarray, density: float) -> np.ndarray:
    """`tau` with all but its round(density * size) largest-magnitude entries set to zero."""
    n = tau.size
    keep = round(density * n)
    if keep >= n:
        return tau
    out = tau.copy()
    drop = np.argpartition(np.abs(tau).ravel(), n - keep)[: n - keep]
    out.reshape(-1)[drop] = 0.0
    return out


def sign_elect_mean(taus: Sequence[np.ndarray]) -> np.ndarray:
    """TIES's merge of (trimmed, weighted) task vectors: each entry takes the sign of the summed values,
    and the mean of the nonzero entries with that sign. An entry whose sum is 0 merges to 0."""
    sign = np.sign(sum(taus))
    total = np.zeros_like(taus[0])
    count = np.zeros_like(taus[0])
    for tau in taus:
        agree = (tau != 0) & (np.sign(tau) == sign)
        total += np.where(agree, tau, np.float32(0.0))
        count += agree
    return total / np.maximum(count, np.float32(1.0))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two flattened tensors; 0 when either is zero (no direction)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.vdot(a, b) / (na * nb), -1.0, 1.0))


def slerp(a: np.ndarray, b: np.ndarray, t: float, stats: dict | None = None) -> np.ndarray:
    """Spherical interpolation of the two tensors seen as flat vectors: the angle comes from their
    directions, the coefficients sin((1-t)w)/sin(w), sin(tw)/sin(w) apply to the tensors themselves (so
    unit vectors stay unit). Nearly colinear (|cos| > SLERP_COLINEAR) or zero tensors fall back to lerp."""
    cos = _cos(a, b)
    angle = math.acos(cos)
    if stats is not None:
        stats.setdefault("angle_deg", []).append(math.degrees(angle))
    if abs(cos) > SLERP_COLINEAR or float(np.linalg.norm(a)) == 0.0 or float(np.linalg.norm(b)) == 0.0:
        return np.float32(1.0 - t) * a + np.float32(t) * b
    s = math.sin(angle)
    return np.float32(math.sin((1.0 - t) * angle) / s) * a + np.float32(math.sin(t * angle) / s) * b


def model_stock_ratio(cos: float, n: int) -> float:
    """Model Stock's interpolation ratio t = N cos / (1 + (N-1) cos), clipped to [0, 1]: at cos <= 0 the
    fine-tuned models share no direction and the anchor alone is kept (t = 0); the formula itself reaches
    1 only at cos = 1, and has a pole at cos = -1/(N-1) that the clip keeps out."""
    if cos <= 0.0:
        return 0.0
    return min(1.0, n * cos / (1.0 + (n - 1) * cos))


def model_stock(thetas: Sequence[np.ndarray], base: np.ndarray, stats: dict | None = None) -> np.ndarray:
    """t * mean(thetas) + (1 - t) * base, with cos the mean pairwise cosine between the task vectors. A
    zero task vector (a layer a model did not change) has cosine 0 with every other, which pulls t toward
    the anchor; when all are zero, every model equals the base and so does the result."""
    n = len(thetas)
    taus = [theta - base for theta in thetas]
    pairs = [_cos(taus[i], taus[j]) for i in range(n) for j in range(i + 1, n)]
    cos = sum(pairs) / len(pairs)
    t = model_stock_ratio(cos, n)
    if stats is not None:
        stats.setdefault("cos", []).append(cos)
        stats.setdefault("t", []).append(t)
    mean = sum(thetas) / np.float32(n)
    return np.float32(t) * mean + np.float32(1.0 - t) * base


def _merge_slice(
    method: str,
    thetas: list[np.ndarray],
    base: np.ndarray | None,
    weights: list[float] | None,
    name: str,
    kw: dict[str, Any],
    stats: dict | None,
) -> np.ndarray:
    """One (layer slice of a) tensor; inputs already float32."""
    if method == "linear":
        return sum(np.float32(w) * x for w, x in zip(weights, thetas, strict=True))
    if method == "slerp":
        return slerp(thetas[0], thetas[1], kw["t"], stats)
    if method == "model_stock":
        return model_stock(thetas, base, stats)
    taus = [theta - base for theta in thetas]
    if method in ("dare_linear", "dare_ties"):
        taus = [dare(tau, kw["drop_rate"], kw["seed"], name, i) for i, tau in enumerate(taus)]
    if method in ("ties", "dare_ties"):
        taus = [trim(tau, kw["density"]) for tau in taus]
    taus = [np.float32(w) * tau for w, tau in zip(weights, taus, strict=True)]
    merged = sign_elect_mean(taus) if method in ("ties", "dare_ties") else sum(taus)
    return base + np.float32(kw["scale"]) * merged


def normalized(weights: list[float]) -> list[float]:
    """Linear's weights scaled to sum to 1."""
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ValueError(f"linear: weights {weights} sum to 0 and cannot be normalised; pass normalize=False")
    return [w / total for w in weights]


def layer_name(name: str, layer: int) -> str:
    """The name a stacked leaf's layer slice goes by (DARE's seed): merging the unstacked layer tensor
    under this name gives the same result as merging the stacked leaf."""
    return f"{name}[{layer}]"


def merge_tensors(
    method: str,
    tensors: Sequence[np.ndarray],
    base: np.ndarray | None = None,
    *,
    weights: Sequence[float] | None = None,
    name: str = "",
    layer_axis: bool = False,
    stats: dict | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Merges one tensor of each model (and of the base, for methods that need it) with `method`.

    Computes in float32 and returns the anchor's dtype (the base's, else the first model's). With
    `layer_axis`, axis 0 indexes layers and each layer is merged on its own. `name` seeds DARE's masks.
    `stats`, when given, collects per-slice statistics (Model Stock's `t` and `cos`, SLERP's `angle_deg`)
    as lists, one entry per layer slice."""
    check_models(method, len(tensors), base is not None)
    kw = resolve_kwargs(method, kwargs)
    w = resolve_weights(method, weights, len(tensors))
    if method == "linear" and kw["normalize"]:
        w = normalized(w)
    tensors = [np.asarray(x) for x in tensors]
    base = None if base is None else np.asarray(base)
    anchor = base if base is not None else tensors[0]
    for i, x in enumerate(tensors):
        if x.shape != anchor.shape:
            what = "the base" if base is not None else "model 0"
            raise ValueError(f"{name or 'tensor'}: model {i} has shape {x.shape}, {what} {anchor.shape}")
    if layer_axis and anchor.ndim == 0:
        raise ValueError(f"{name or 'tensor'}: layer_axis=True needs a leading layer axis, got a scalar")
    if method == "slerp" and kw["t"] in (0.0, 1.0):
        # The endpoints themselves, not a float32 round trip through the formula.
        return tensors[int(kw["t"])].astype(anchor.dtype, copy=True)

    def one(index: Any, slice_name: str) -> np.ndarray:
        f32 = [np.asarray(x[index], np.float32) for x in tensors]
        b32 = None if base is None else np.asarray(base[index], np.float32)
        return _merge_slice(method, f32, b32, w, slice_name, kw, stats)

    if not layer_axis:
        return np.asarray(one(..., name)).astype(anchor.dtype)
    out = np.empty(anchor.shape, anchor.dtype)
    for layer in range(anchor.shape[0]):
        out[layer] = one(layer, layer_name(name, layer))
    return out


def path_name(path: tuple) -> str:
    """'layers/stack/attn/q_proj/kernel' for a jax key path (or a tuple of strings)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def is_stacked(name: str) -> bool:
    """Whether a leaf holds all decoder layers along axis 0 (our scanned layer stack)."""
    return name.startswith("layers/stack/")


def merge_trees(
    method: str,
    trees: Sequence[Any],
    base: Any | None = None,
    *,
    weights: Sequence[float] | None = None,
    stats: dict | None = None,
    **kwargs: Any,
) -> Any:
    """`merge_tensors` over every leaf of same-structured param trees (unboxed), in memory. Leaves under
    layers/stack are merged per layer. Returns a tree of numpy arrays in the anchor's dtypes. `stats`, when
    given, is filled as {leaf name: {stat: [per-slice values]}}."""
    check_models(method, len(trees), base is not None)
    flat = [jax.tree_util.tree_flatten_with_path(t) for t in trees]
    anchor_flat, treedef = flat[0] if base is None else jax.tree_util.tree_flatten_with_path(base)
    for i, (_, td) in enumerate(flat):
        if td != treedef:
            raise ValueError(f"{method}: tree {i} has a different structure than the anchor: {td} vs {treedef}")
    leaves = []
    for j, (path, anchor_leaf) in enumerate(anchor_flat):
        name = path_name(path)
        leaf_stats = None if stats is None else stats.setdefault(name, {})
        leaves.append(
            merge_tensors(
                method,
                [jax.device_get(f[0][j][1]) for f in flat],
                None if base is None else jax.device_get(anchor_leaf),
                weights=weights,
                name=name,
                layer_axis=is_stacked(name),
                stats=leaf_stats,
                **kwargs,
            )
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)
