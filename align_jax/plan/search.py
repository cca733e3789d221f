"""The search: the least rematerialisation, then the fewest microbatches, whose compiled step fits.

Remat comes first because it costs FLOPs: full remat recomputes each layer's forward in the backward pass
(about +1/3 of the step's FLOPs), and k layers per unit one more forward on top. Microbatches cost no FLOPs
at a fixed global batch (the step accumulates gradients over them); only per-microbatch overheads (FSDP
weight gathers, smaller matmuls). So the ladder below goes from the cheapest remat to the most memory-
saving, and on the first rung where any microbatch count fits, the fewest microbatches that fit win.

Compiles are the cost of a search (seconds for small models, minutes for 8B-70B on a shared CPU), so it
spends few, by bisection on two orders: memory falls as the microbatch shrinks (so a rung fits at some
count iff it fits at the most microbatches), and falls down the ladder (each rung keeps less for the
backward pass; k layers per unit keep L/k + k residual streams instead of L). The first rung that fits
at the most microbatches is found by bisection over the rungs, then its fewest microbatches by bisection
over the counts. The preset's own setting bounds both: where it fits, nothing above its rung is tried;
where it does not at the most microbatches, nothing below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True, order=True)
class Remat:
    """A rung of the ladder: config.model.remat_policy and config.model.layers_per_unit."""

    policy: str
    layers_per_unit: int = 1

    def __str__(self) -> str:
        return self.policy if self.layers_per_unit == 1 else f"{self.policy}/k={self.layers_per_unit}"


# Least recompute first. save_dots keeps every matmul output (recomputes only elementwise ops);
# save_qkv_attn keeps the attention's projections and context; full keeps only each unit's input.
LADDER = (
    Remat("none"),
    Remat("save_dots"),
    Remat("save_qkv_attn"),
    Remat("full"),
    Remat("full", 2),
    Remat("full", 4),
)


def ladder(num_layers: int) -> list[Remat]:
    """The rungs whose layers_per_unit divides the model's layers."""
    return [r for r in LADDER if num_layers % r.layers_per_unit == 0]


@dataclasses.dataclass
class Candidate:
    microbatches: int
    remat: Remat
    peak: int | None  # bytes per chip; None: the settings are not valid here (e.g. a batch the mesh cannot split)
    fits: bool


def _first_fit(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The first i in [lo, hi] with fits(i), given that fits(hi) and that fits is monotone."""
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def search(
    microbatch_options: Sequence[int],
    rungs: Sequence[Remat],
    measure: Callable[[int, Remat], Candidate],
    known: Candidate | None = None,
) -> tuple[Candidate | None, list[Candidate]]:
    """(the best candidate that fits or None, the candidates compiled, in order). `measure(m, remat)`
    compiles one setting; `known` is one already measured (the preset as configured)."""
    options, rungs = sorted(set(microbatch_options)), list(rungs)
    tried: dict[tuple[int, Remat], Candidate] = {}

    def get(m: int, remat: Remat) -> Candidate:
        if known is not None and (m, remat) == (known.microbatches, known.remat):
            return known
        if (m, remat) not in tried:
            tried[(m, remat)] = measure(m, remat)
        return tried[(m, remat)]

    fallback = known if known is not None and known.fits else None  # a preset's setting off the ladder
    if not options or not rungs:
        return fallback, list(tried.values())
    top = options[-1]
    lo, hi, hi_fits = 0, len(rungs) - 1, False
    if known is not None and known.remat in rungs and known.microbatches in options:
        k = rungs.index(known.remat)
        if known.fits:  # fits at its count, so at the most microbatches too
            hi, hi_fits = k, True
        elif known.microbatches == top:
            lo = k + 1
    if lo > hi or not (hi_fits or get(top, rungs[hi]).fits):
        return fallback, list(tried.values())
    remat = rungs[_first_fit(lo, hi, lambda i: get(top, rungs[i]).fits)]
    usable = options
    if known is not None and known.fits and remat == known.remat:
        usable = [m for m in options if m <= known.microbatches]
    m = usable[_first_fit(0, len(usable) - 1, lambda i: get(usable[i], remat).fits)]
    return get(m, remat), list(tried.values())
