"""Packing of tokenised examples into fixed-shape rows, as few as it can find, window by window.

A stream of examples is cut into windows; each window is packed on its own. Packing window by window
keeps memory bounded and makes every row a pure function of one window's examples in order (which is
what lets the pipeline resume mid-epoch by re-packing a single window).

A window is packed row by row, each row filled as exactly as possible: it opens with the longest
example left, takes examples in a fixed pseudo-random order while it has plenty of room (so rows, and
what is left for the later rows, stay a representative mix of lengths), then is closed with one, two or
three examples that fill its room exactly, found with bitsets of the lengths left; failing that, with
the longest example that still leaves room for another, and again. Rows that all fill exactly leave only
the last one partly empty. With `max_items` (the preference pipeline's pairs-per-row limit) a row also
closes when it holds that many examples, keeping its last free places for the exact closers; without it
the placement is unchanged. If the rows are more than a lower bound on how few there can be, the window
is packed again in up to seven other fixed orders, and then best-fit-decreasing; the fewest rows win.
With ~1000-example windows this wastes well under 1% of the slots on chat-sized and log-normal length
mixes, within a row of the bound in nearly every window.

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

from align_jax.batch import TOKEN_FIELDS

OVER_LONG = ("truncate", "drop")
# Bumped whenever the placement changes: a saved iterator position is only exact under the packer
# that produced it, so the pipeline records this in its state and refuses a mismatch.
PACKER_VERSION = 2
FIELDS = tuple(TOKEN_FIELDS)  # the packed row's fields, declared in align_jax/batch.py
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


# Odd 32-bit multipliers: each hashes example indices into one fixed pseudo-random order (see _fill_rows).
_ORDERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xFD7046C5, 0xB55A4F09, 0xE6546B65)
# While a row has more room than this many of the longest unplaced examples, it takes examples in the
# pseudo-random order; below it, it is closed with exact completions.
_SAMPLE_ABOVE = 3
# Most first members tried when looking for three examples that fill a row's room exactly.
_MAX_TRIPLES = 64


def _lower_bound(lengths: Sequence[int], seq_len: int, max_items: int | None = None) -> int:
    """No packing has fewer rows: the tokens must fit, no two examples longer than half a row share one,
    and no row holds more examples than the most of the shortest that fit together (nor than max_items)."""
    if not lengths:
        return 0
    ascending = np.sort(np.asarray(lengths, np.int64))
    most = int(np.searchsorted(np.cumsum(ascending), seq_len, side="right"))
    most = min(most, max_items) if max_items else most
    return max(-(-int(ascending.sum()) // seq_len), int((2 * ascending > seq_len).sum()), -(-len(lengths) // most))


def _best_fit_decreasing(lengths: Sequence[int], seq_len: int, max_items: int | None = None) -> list[list[int]]:
    """Longest first, each into the open row with the least room that still fits it, or a new row. A row
    that holds max_items examples is closed."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index) of rows with room, sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[i]
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room > length and (not max_items or len(rows[r]) < max_items):
            bisect.insort(free, (room - length, r))
    return rows


class _Unplaced:
    """The examples not in a row yet, kept by length so that exact closers are found with bit operations.

    `count[n]` are left of length n, `have` has bit n set while there are any, and `mirror` has bit
    seq_len - n set likewise, so the lengths a with a and r - a both present are the set bits of
    `have & (mirror >> (seq_len - r))`: one shift and one and, instead of a search over the lengths."""

    def __init__(self, lengths: Sequence[int], seq_len: int):
        self.seq_len = seq_len
        self.count = [0] * (seq_len + 1)
        self.waiting: dict[int, list[int]] = {}  # length -> unplaced examples of it, latest first
        # Filled backwards so that popping from the end hands out each length's examples in index order.
        for i in range(len(lengths) - 1, -1, -1):
            self.count[lengths[i]] += 1
            self.waiting.setdefault(lengths[i], []).append(i)
        self.have = self.mirror = 0
        for n in self.waiting:
            self.have |= 1 << n
            self.mirror |= 1 << (seq_len - n)
        self.shortest, self.longest = min(self.waiting, default=0), max(self.waiting, default=0)
        self.left = len(lengths)

    def take(self, n: int, row: list[int]) -> None:
        """Moves the earliest unplaced example of length `n` into `row`, keeping the bitsets and the
        shortest and longest lengths left up to date (the closing moves read them every step)."""
        row.append(self.waiting[n].pop())
        self.count[n] -= 1
        self.left -= 1
        if not self.count[n]:
            self.have ^= 1 << n
            self.mirror ^= 1 << (self.seq_len - n)
            if n == self.shortest:
                self.shortest = (self.have & -self.have).bit_length() - 1
            if n == self.longest:
                self.longest = self.have.bit_length() - 1

    def pair(self, r: int, used: int = 0) -> tuple[int, int] | None:
        """The most even two lengths a >= b present with a + b = r (beside one example of length `used`).
        Even pairs first: they leave both the long and the short examples for the rows still to fill."""
        count = self.count
        half = (r + 1) // 2
        both = (self.have & (self.mirror >> (self.seq_len - r))) >> half
        while both:
            low = both & -both
            both ^= low
            a = half + low.bit_length() - 1
            b = r - a
            if count[a] - (a == used) - (a == b) > 0 and count[b] - (b == used) > 0:
                return a, b
        return None

    def triple(self, room: int) -> tuple[int, int, int] | None:
        """Three lengths present that sum to `room`: a first member a, longest first, then the most even
        pair for room - a. At most _MAX_TRIPLES first members are tried, which bounds the cost of a row
        that has no exact triple."""
        firsts = self.have & ((2 << (room - 2 * self.shortest)) - 1)
        for _ in range(_MAX_TRIPLES):
            if not firsts:
                break
            a = firsts.bit_length() - 1
            firsts ^= 1 << a
            rest = self.pair(room - a, a)
            if rest is not None:
                return (a, *rest)
        return None

    def exact(self, room: int, places: int) -> tuple[int, ...] | None:
        """One, two or three lengths present that fill `room` exactly, using at most `places` examples
        (the row's places left under max_items); the fewest examples first."""
        if self.count[room]:
            return (room,)
        found = self.pair(room) if places >= 2 else None
        if found is None and room >= 3 * self.shortest and places >= 3:
            return self.triple(room)
        return found

    def filler(self, room: int, places: int) -> int:
        """The length to place when nothing fills `room` exactly: the longest that still leaves room for
        another example (so the row can be closed exactly later), else just the longest that fits."""
        have = self.have
        fits = have & ((2 << (room - self.shortest)) - 1) if room >= 2 * self.shortest and places >= 2 else 0
        return (fits or have & ((2 << room) - 1)).bit_length() - 1


def _sampling_order(lengths: Sequence[int], multiplier: int) -> list[int]:
    """The example lengths in a fixed pseudo-random order: the indices hashed by `multiplier` (Knuth's
    multiplicative hashing), so each multiplier gives another order and the same one on every run."""
    keys = (np.arange(len(lengths), dtype=np.uint64) * np.uint64(multiplier)) & np.uint64(0xFFFFFFFF)
    return np.asarray(lengths)[np.argsort(keys, kind="stable")].tolist()


class _RowFiller:
    """Fills rows one at a time, each as exactly as it can (see the module docstring): opened with the
    longest example left, then sampled in a fixed pseudo-random order, then closed exactly.

    With `max_items`, sampling stops while the row still has room for the closers (up to three), and each
    closing move only uses as many examples as the row has places left for. Without it every such check
    passes, so the placement is exactly the unlimited one."""

    def __init__(self, lengths: Sequence[int], seq_len: int, multiplier: int, max_items: int | None):
        self.seq_len = seq_len
        self.limit = max_items or 1 << 62
        self.unplaced = _Unplaced(lengths, seq_len)
        self.stream = _sampling_order(lengths, multiplier)
        self.next_sample = 0  # the sampling order's cursor: it carries on across rows

    def fill_row(self) -> list[int]:
        """The next row's example indices."""
        pool = self.unplaced
        row: list[int] = []
        room = self.seq_len - pool.longest
        pool.take(pool.longest, row)
        room = self._sample(row, room)
        self._close(row, room)
        return row

    def _sample(self, row: list[int], room: int) -> int:
        """Adds examples in the sampling order while the row has plenty of room; returns the room left.
        Representative rows keep the unplaced examples representative too, so the last rows still have a
        mix of lengths to fill exactly with."""
        pool, stream, limit = self.unplaced, self.stream, self.limit
        while pool.left and self.next_sample < len(stream):
            n = stream[self.next_sample]
            if not pool.count[n]:  # every example of this length is placed already
                self.next_sample += 1
                continue
            if room <= _SAMPLE_ABOVE * pool.longest or n > room - pool.shortest or len(row) + 3 >= limit:
                break
            self.next_sample += 1
            pool.take(n, row)
            room -= n
        return room

    def _close(self, row: list[int], room: int) -> None:
        """Closes the row: one, two or three examples that fill the room exactly, else a filler that leaves
        room for another, and again, until nothing more fits."""
        pool, limit = self.unplaced, self.limit
        while pool.left and room >= pool.shortest and len(row) < limit:
            places = limit - len(row)
            found = pool.exact(room, places)
            if found is not None:
                for n in found:
                    pool.take(n, row)
                return
            n = pool.filler(room, places)
            pool.take(n, row)
            room -= n


def _fill_rows(lengths: Sequence[int], seq_len: int, multiplier: int, max_items: int | None = None) -> list[list[int]]:
    """Rows of example indices, filled one at a time by a `_RowFiller` until every example is placed."""
    filler = _RowFiller(lengths, seq_len, multiplier, max_items)
    rows: list[list[int]] = []
    while filler.unplaced.left:
        rows.append(filler.fill_row())
    return rows


def assign_rows(lengths: Sequence[int], seq_len: int, max_items: int | None = None) -> list[list[int]]:
    """Rows of example indices (each row's lengths sum to at most seq_len, and it holds at most max_items
    of them), as few as it finds: exact filling in each fixed order until one reaches the lower bound, with
    best-fit-decreasing as the fallback; ties go to the earlier. Deterministic in the lengths and their order."""
    if len(lengths) and not 1 <= min(lengths) <= max(lengths) <= seq_len:
        raise ValueError(f"lengths must be in 1..{seq_len}; got {min(lengths)}..{max(lengths)}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items={max_items}: must be >= 1 (or None for no limit)")
    bound = _lower_bound(lengths, seq_len, max_items)
    best: list[list[int]] | None = None
    for multiplier in _ORDERS:
        rows = _fill_rows(lengths, seq_len, multiplier, max_items)
        if best is None or len(rows) < len(best):
            best = rows
        if len(best) <= bound:
            return best
    rows = _best_fit_decreasing(lengths, seq_len, max_items)
    return rows if best is None or len(rows) < len(best) else best


def layout_row(sequences: Sequence[Example], seq_len: int) -> Row:
    """One row holding `sequences` in order as segments 1, 2, ..., then padding (see the module docstring)."""
    row = {k: np.zeros(seq_len, np.int32) for k in FIELDS}
    pos = 0
    for seg, (ids, mask) in enumerate(sequences, start=1):
        end = pos + len(ids)
        row["tokens"][pos:end] = ids
        row["positions"][pos:end] = np.arange(len(ids), dtype=np.int32)
        row["segment_ids"][pos:end] = seg
        row["loss_mask"][pos:end] = mask
        row["loss_mask"][pos] = 0
        pos = end
    return row


def pack_window(
    examples: Sequence[Example], seq_len: int, over_long: str = "truncate", max_items: int | None = None
) -> tuple[list[Row], PackingStats]:
    """Packs one window of examples into as few rows as it finds (see the module docstring), at most
    `max_items` per row if given. Returns the rows (in the order they were filled) and this window's stats.
    Deterministic for the same examples in the same order."""
    if over_long not in OVER_LONG:
        raise ValueError(f"over_long={over_long!r}; expected one of {OVER_LONG}")
    stats = PackingStats()
    kept = [ex for ex in (_fit(e, seq_len, over_long, stats) for e in examples) if ex is not None]
    rows = assign_rows([len(ids) for ids, _ in kept], seq_len, max_items)
    out = [layout_row([kept[i] for i in members], seq_len) for members in rows]
    stats.real_tokens += sum(len(ids) for ids, _ in kept)
    stats.examples += len(kept)
    stats.rows += len(out)
    stats.slots += len(out) * seq_len
    return out, stats


class Packer:
    """Streams rows out of a stream of examples, packing each window of `window` examples.

    `stats` accumulates over everything packed so far."""

    def __init__(self, seq_len: int, window: int = 1000, over_long: str = "truncate", max_items: int | None = None):
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len}: need at least 2 tokens (one to predict from, one target)")
        if window < 1:
            raise ValueError(f"window={window}: must be >= 1")
        if over_long not in OVER_LONG:
            raise ValueError(f"over_long={over_long!r}; expected one of {OVER_LONG}")
        self.seq_len, self.window, self.over_long, self.max_items = seq_len, window, over_long, max_items
        self.stats = PackingStats()

    def _flush(self, buffer: list[Example]) -> list[Row]:
        rows, stats = pack_window(buffer, self.seq_len, self.over_long, self.max_items)
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
