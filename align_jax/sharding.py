"""Device mesh, logical-axis rules, and the shardings derived from them.

Model code names logical axes (`embed`, `heads`, `activation_batch`, ...); a short rules table maps each
to physical mesh axes (`data`, `fsdp`, `tensor`, `sequence`). The same model then runs on one CPU, eight
fake CPU devices, a GPU or a TPU slice; only the mesh shape changes.

`sequence` splits each row's positions (`activation_length`); attention then runs as Ulysses sequence
parallelism (align_jax/models/sequence_parallel.py, docs/sequence_parallel.md), and the parameters are
split over it as over `fsdp`.

Resolution is shape-aware: a mesh axis that does not divide a dimension is dropped for that array
(the dimension is replicated over it) instead of failing. That keeps tiny test models (2 KV heads on a
4-way tensor axis) and odd batch sizes working; on real models the rules divide evenly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# `expert` holds a mixture-of-experts model's experts (the rule below); elsewhere it is one more batch axis.
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert")

# One rule per logical name. A value is a mesh axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", "sequence"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Parameters are split over `sequence` too: its devices hold other tokens of the same rows, so, like
    # fsdp's, they need whole weights only one layer at a time (sequence_parallel.py).
    ("embed", ("fsdp", "sequence")),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("expert", "expert"),
)

Rules = tuple[tuple[str, Any], ...]


class ShardingError(ValueError):
    """A mesh shape or rules table that cannot work."""


def normalize_rules(rules: Sequence[Sequence[Any]] | Mapping[str, Any] | None) -> Rules:
    """Validates a rules table and returns it as a hashable tuple."""
    if rules is None:
        return DEFAULT_RULES
    items = list(rules.items()) if isinstance(rules, Mapping) else [tuple(r) for r in rules]
    seen: set[str] = set()
    out = []
    for item in items:
        if len(item) != 2:
            raise ShardingError(f"a rule is (logical_name, mesh_axes); got {item!r}")
        name, axes = item
        if name in seen:
            raise ShardingError(f"logical axis {name!r} has more than one rule")
        seen.add(name)
        if isinstance(axes, list):
            axes = tuple(axes)
        for ax in (axes,) if isinstance(axes, str) else (axes or ()):
            if ax not in MESH_AXES:
                raise ShardingError(f"rule for {name!r} names mesh axis {ax!r}; mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, tensor, sequence). Missing axes have size 1; one axis may be -1,
    meaning 'all the devices the others leave'. `None` puts every device on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"mesh shape names unknown axes {sorted(unknown)}; mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(ax, 1)) for ax in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in sizes:
        rest = math.prod(s for s in sizes if s != -1)
        if rest <= 0 or len(devices) % rest:
            raise ShardingError(f"mesh {shape} does not fit {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // rest
    if math.prod(sizes) != len(devices):
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, but there are {len(devices)}"
        )
    # Auto axes: the compiler propagates shardings from our annotations (GSPMD). JAX >= 0.7 would
    # otherwise default to Explicit axes, where every op must state its output sharding.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices, axis_types=auto)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

    A mesh axis is used at most once per array, and only if (with the axes before it in the rule)
    it divides the dimension."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept: list[str] = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or dim % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            if size > 1:
                kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Mesh + rules, carried by the model to constrain activations. Hashable (a Linen attribute).

    With `mesh=None` every method is the identity, so the model runs unsharded."""

    mesh: Mesh | None = None
    rules: Rules = DEFAULT_RULES

    def spec(self, names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
        assert self.mesh is not None
        return logical_to_spec(names, shape, self.mesh, self.rules)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        assert self.mesh is not None
        return NamedSharding(self.mesh, self.spec(names, shape))

    def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        if self.mesh is None or self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))


def tree_shardings(boxed_tree: Any, sharder: Sharder) -> Any:
    """NamedShardings for a tree whose leaves are Flax logical boxes (or plain arrays: replicated)."""

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned):
            return sharder.sharding(leaf.names, leaf.value.shape)
        return NamedSharding(sharder.mesh, PartitionSpec())

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def sharded_init(init_fn: Callable[..., Any], sharder: Sharder, *args: Any) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` (which returns a boxed tree) straight into its shardings.

    The shapes and logical names come from `jax.eval_shape`, so no host ever holds the whole
    unsharded tree. Returns (unboxed sharded arrays, their NamedShardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, sharder)
    init = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)
    return init(*args), shardings


def batch_sharding(sharder: Sharder, ndim: int = 2) -> NamedSharding:
    """The sharding of a batch array [B, T, ...]: batch over the data axes, length over `sequence`."""
    names = ("activation_batch", "activation_length") + (None,) * (ndim - 2)
    table = dict(sharder.rules)
    spec = [table.get(n) if n else None for n in names[:ndim]]
    return NamedSharding(sharder.mesh, PartitionSpec(*spec))
