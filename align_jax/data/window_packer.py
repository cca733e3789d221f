"""What both loaders (shuffled train, ordered eval) are built on: the `WindowPacker` protocol (a window
of row indices -> packed rows), the on_bad_row policy its packers apply, and the stats and batch
helpers the loaders share."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from align_jax.data.formats import BadRowError
from align_jax.data.packing import PackingStats, Row
from align_jax.data.sources import RowSource

# Named as before these classes left pipeline.py: log filters (and tests) select bad-row warnings by it.
logger = logging.getLogger("align_jax.data.pipeline")

ON_BAD_ROW = ("error", "skip")
# Bad rows logged one by one in skip mode; after that only counted (see the loaders' `stats()`).
MAX_LOGGED_BAD_ROWS = 5
Batch = dict[str, np.ndarray]


class BadRows:
    """The on_bad_row policy: "error" raises the BadRowError; "skip" counts it in `stats["bad_rows"]` and
    logs the first MAX_LOGGED_BAD_ROWS. `stats=None` replays silently (a resumed window whose bad rows
    were already counted and logged)."""

    def __init__(self, on_bad_row: str):
        self.on_bad_row = on_bad_row
        self.logged = 0
        # False on a later epoch's pass over the same rows: `bad_rows` counts distinct rows, not visits.
        self.counting = True

    def handle(self, error: BadRowError, stats: dict[str, int] | None) -> None:
        if self.on_bad_row == "error":
            raise error
        if stats is not None and self.counting:
            stats["bad_rows"] += 1
            if self.logged < MAX_LOGGED_BAD_ROWS:
                self.logged += 1
                more = " (further bad rows are only counted)" if self.logged == MAX_LOGGED_BAD_ROWS else ""
                logger.warning("skipping bad row: %s%s", error, more)


class WindowPacker(Protocol):
    """What a window of row indices becomes: the rows `pack` returns are a pure function of the indices
    (in order); `settings` are the values that change them (a resumed position needs them unchanged);
    `empty(n)` is `n` stacked all-padding rows (no targets) that pad a final eval batch."""

    source: RowSource
    bad_rows: BadRows

    def pack(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Row]: ...

    def settings(self) -> dict[str, Any]: ...

    def empty(self, n: int) -> Batch: ...


def add_packing_stats(stats: dict[str, int] | None, pstats: PackingStats) -> None:
    """Adds one window's packing counts to a loader's stats (`None`: a silent replay, nothing to add)."""
    if stats is not None:
        for k, v in dataclasses.asdict(pstats).items():
            stats[k] += v


def new_stats() -> dict[str, int]:
    """A loader's counts before it has read anything."""
    return {"bad_rows": 0, **dataclasses.asdict(PackingStats()), "batches": 0}


def report_stats(stats: dict[str, int], **extra: Any) -> dict[str, Any]:
    """The counts as logged: with the packing efficiency (real tokens / slots) and any `extra` values."""
    efficiency = stats["real_tokens"] / stats["slots"] if stats["slots"] else 0.0
    return {**stats, "packing_efficiency": efficiency, **extra}


def host_batch_size(cfg: Any, process_count: int) -> int:
    """Rows per host in each batch: the global `cfg.batch_size` must split evenly over the processes."""
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes")
    return cfg.batch_size // process_count


def stack_rows(rows: Sequence[Row]) -> Batch:
    """Rows (dicts of [T] arrays) as one batch (a dict of [len(rows), T] arrays)."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
