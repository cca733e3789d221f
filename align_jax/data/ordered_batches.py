"""The eval loader's machinery: one ordered, finite, re-iterable pass over a split as this host's batches
of the rows a `WindowPacker` makes.

Every host tokenises and packs the whole split in file order (eval sets are small), pads the rows to
whole global batches with empty rows, and takes its slice of each. Reading everything on every host is
what guarantees all hosts agree on the number of eval batches without talking to each other; with a
sharded split they would not, and a multi-host eval would hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from align_jax.data.packing import Row
from align_jax.data.window_packer import (
    Batch,
    WindowPacker,
    host_batch_size,
    new_stats,
    report_stats,
    stack_rows,
)


class OrderedBatches:
    """One ordered pass over a split as this host's batches; `len()` is the same on every host and
    iterating again starts over. The final global batch is filled up with empty rows (no targets).

    `cache=True` keeps the packed rows (eval sets are small); `cache=False` streams window by window and
    keeps nothing (a pass over a whole train split); `len()` then costs one extra pass, once."""

    def __init__(self, windows: WindowPacker, cfg: Any, process_index: int, process_count: int, cache: bool = True):
        host_batch = host_batch_size(cfg, process_count)
        self.cfg = cfg
        self.host_batch = host_batch
        self.process_index = process_index
        self._examples = windows
        self._num_rows = len(windows.source)
        self._cache = cache
        self._rows: list[Row] | None = None
        self._num_packed: int | None = None  # rows in the whole pass, once one pass has counted them
        self._stats = new_stats()

    def _pass(self) -> Iterator[Row]:
        order = np.arange(self._num_rows)
        windows = np.array_split(order, max(1, round(self._num_rows / self.cfg.pack_window)))
        # Only the first whole pass counts (and logs); the later ones replay the same windows silently.
        stats = new_stats() if self._num_packed is None else None
        count = 0
        for w in windows:
            for row in self._examples.pack(w.tolist(), stats):
                count += 1
                yield row
        if stats is not None:
            self._stats, self._num_packed = stats, count

    def _stream(self) -> Iterator[Row]:
        if not self._cache:
            return self._pass()
        if self._rows is None:
            self._rows = list(self._pass())
        return iter(self._rows)

    def __len__(self) -> int:
        if self._num_packed is None:
            for _ in self._stream():
                pass
        return -(-self._num_packed // self.cfg.batch_size)  # type: ignore[operator]

    def __iter__(self) -> Iterator[Batch]:
        # Every host packs every row and takes its own slice of each global batch.
        lo, hi = self.process_index * self.host_batch, (self.process_index + 1) * self.host_batch
        buffer: list[Row] = []
        for row in self._stream():
            buffer.append(row)
            if len(buffer) == self.cfg.batch_size:
                yield self._batch(buffer[lo:hi])
                buffer = []
        if buffer:
            yield self._batch(buffer[lo:hi])

    def _batch(self, mine: list[Row]) -> Batch:
        pad = self._examples.empty(self.host_batch - len(mine))
        if not mine:
            return pad
        batch = stack_rows(mine)
        return {k: np.concatenate([batch[k], pad[k]]) for k in batch}

    def stats(self) -> dict[str, Any]:
        return report_stats(self._stats, batches=len(self))
