"""The mesh a plan compiles on: the preset's own, or the preset's rescaled to the topology's chip count.

Rule (`fit_mesh`): a preset's mesh that the chips can take as it is (its sizes multiply to the chip count,
or its one -1 axis takes what the others leave) is used unchanged. Otherwise the model-parallel axes
(tensor, sequence, expert) are kept where their product divides the chip count, else set to 1, and fsdp
takes every chip they leave, with data = 1: FSDP shards params, gradients and optimizer state over the
most chips, and the train state is what usually decides whether a model fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from align_jax.sharding import MESH_AXES

MODEL_AXES = ("tensor", "sequence", "expert")


def resolve(shape: Mapping[str, int], chips: int) -> dict[str, int] | None:
    """`shape` with its -1 axis filled in for `chips` devices, or None when it cannot cover them."""
    sizes = {ax: int(shape.get(ax, 1)) for ax in MESH_AXES}
    free = [ax for ax, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if len(free) > 1 or fixed <= 0 or chips % fixed:
        return None
    if free:
        sizes[free[0]] = chips // fixed
    return sizes if math.prod(sizes.values()) == chips else None


def fit_mesh(shape: Mapping[str, int], chips: int) -> tuple[dict[str, int], str]:
    """(mesh sizes over every axis, how they were chosen) for `chips` devices (module docstring)."""
    as_is = resolve(shape, chips)
    if as_is is not None:
        return as_is, "the preset's mesh"
    model = {ax: int(shape.get(ax, 1)) for ax in MODEL_AXES}
    model = {ax: max(s, 1) for ax, s in model.items()}
    if chips % math.prod(model.values()):
        model = dict.fromkeys(MODEL_AXES, 1)
    sizes = {ax: 1 for ax in MESH_AXES}
    sizes.update(model)
    sizes["fsdp"] = chips // math.prod(model.values())
    kept = ", ".join(f"{ax}={s}" for ax, s in model.items() if s > 1) or "no model-parallel axes"
    note = f"rescaled from the preset's {dict(shape)} to {chips} chips: {kept} kept, fsdp takes the rest"
    return sizes, note


def parse_mesh(text: str, chips: int) -> dict[str, int]:
    """`--mesh fsdp=4,tensor=2` (one size may be -1; unnamed axes are 1) for `chips` devices."""
    shape = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, size = part.partition("=")
        if name not in MESH_AXES or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected axis=size pairs over {MESH_AXES}, e.g. fsdp=4,tensor=2")
        shape[name] = int(size)
    sizes = resolve(shape, chips)
    if sizes is None:
        raise ValueError(f"--mesh {text!r} does not cover the topology's {chips} chips")
    return sizes


def describe(sizes: Mapping[str, int]) -> str:
    """`fsdp=4 x tensor=2`: the axes larger than 1 (or `1 device`)."""
    parts = [f"{ax}={s}" for ax, s in sizes.items() if s > 1]
    return " x ".join(parts) or "1 device"
