"""Best-fit-decreasing packing of tokenised examples into fixed-shape rows.

A stream of examples is cut into windows; each window is packed on its own: its examples sorted by
length (longest first, ties in arrival order) and each put into the open row with the least room that
still fits it, or a new row. Packing window by window keeps memory bounded, makes every row a pure
function of one window's examples (which is what lets the pipeline resume mid-epoch by re-packing a
single window), and with ~1000-example windows wastes well under 1% of the slots.

Each row is `seq_len` long:
  tokens       int32  the packed sequences, then padding (0)
  positions    int32  0, 1, ... restarting at every sequence
  segment_ids  int32  1, 2, ... per sequence in the row; 0 on padding
  loss_mask    int32  the example's mask, with 0 on padding and on each sequence's first token: nothing
                      in the row predicts it (the token before it belongs to another sequence)
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

OVER_LONG = ("truncate", "drop")
FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
Example = tuple[np.ndarray, np.ndarray]  # (input_ids [L], loss_mask [L])
Row = dict[str, np.ndarray]


@dataclasses.dataclass
class PackingStats:
    """Counts over everything packed so far. `examples` counts those placed in rows (truncated ones
    included); `dropped` are over-long examples under over_long="drop"; `no_target` are examples left
    with no target token (e.g. truncated before the answer), dropped because they teach nothing."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    no_target: int = 0
    rows: int = 0
    real_tokens: int = 0
    slots: int = 0

    @property
    def efficiency(self) -> float:
        """Real (non-padding) tokens / token slots in the rows emitted."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def add(self, other: PackingStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "packing_efficiency": self.efficiency}


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
    """`n` all-padding rows (segment 0, no targets), stacked: pads a short final batch."""
    return {k: np.zeros((n, seq_len), np.int32) for k in FIELDS}


def _fit(example: Example, seq_len: int, over_long: str, stats: PackingStats) -> Example | None:
    ids, mask = (np.asarray(a, np.int32) for a in example)
    if ids.ndim != 1 or ids.shape != mask.shape:
        raise ValueError(f"an example is (input_ids[L], loss_mask[L]); got shapes {ids.shape} and {mask.shape}")
    if len(ids) > seq_len:
        if over_long == "drop":
            stats.dropped += 1
            return None
        stats.truncated += 1
        ids, mask = ids[:seq_len], mask[:seq_len]
    if len(ids) == 0 or not mask[1:].any():
        stats.no_target += 1
        return None
    return ids, mask


def pack_window(
    examples: Sequence[Example], seq_len: int, over_long: str = "truncate"
) -> tuple[list[Row], PackingStats]:
    """Packs one window of examples best-fit-decreasing. Returns the rows (in the order they were
    opened) and this window's stats. Deterministic for the same examples in the same order."""
    if over_long not in OVER_LONG:
        raise ValueError(f"over_long={over_long!r}; expected one of {OVER_LONG}")
    stats = PackingStats()
    kept = [ex for ex in (_fit(e, seq_len, over_long, stats) for e in examples) if ex is not None]
    order = sorted(range(len(kept)), key=lambda i: (-len(kept[i][0]), i))

    rows: list[list[int]] = []  # example indices per row, in placement order
    free: list[tuple[int, int]] = []  # (room left, row index) of rows with room, sorted
    for i in order:
        length = len(kept[i][0])
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - length > 0:
            bisect.insort(free, (room - length, r))

    out = []
    for members in rows:
        row = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
        pos = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = kept[i]
            end = pos + len(ids)
            row["tokens"][pos:end] = ids
            row["positions"][pos:end] = np.arange(len(ids), dtype=np.int32)
            row["segment_ids"][pos:end] = seg
            row["loss_mask"][pos:end] = mask
            row["loss_mask"][pos] = 0
            pos = end
        out.append(row)
        stats.real_tokens += pos
    stats.examples += len(kept)
    stats.rows += len(out)
    stats.slots += len(out) * seq_len
    return out, stats


class Packer:
    """Streams rows out of a stream of examples, packing each window of `window` examples.

    `stats` accumulates over everything packed so far."""

    def __init__(self, seq_len: int, window: int = 1000, over_long: str = "truncate"):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: need at least 2 tokens (one to predict from, one target)")
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        if over_long not in OVER_LONG:
            raise ValueError(f"over_long={over_long!r}; expected one of {OVER_LONG}")
        self.seq_len, self.window, self.over_long = seq_len, window, over_long
        self.stats = PackingStats()

    def _flush(self, buffer: list[Example]) -> list[Row]:
        rows, stats = pack_window(buffer, self.seq_len, self.over_long)
        self.stats.add(stats)
        return rows

    def pack(self, examples: Iterable[Example]) -> Iterator[Row]:
        buffer: list[Example] = []
        for example in examples:
            buffer.append(example)
            if len(buffer) == self.window:
                yield from self._flush(buffer)
                buffer = []
        if buffer:
            yield from self._flush(buffer)

    __call__ = pack
