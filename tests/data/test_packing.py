"""Packing: nothing lost or duplicated, row invariants, rows filled exactly, efficiency, determinism."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from align_jax.data.packing import FIELDS, Packer, _best_fit_decreasing, _lower_bound, pack_window


def make_examples(lengths, seed=0):
    """Example i holds tokens that identify it (i * 10_000 + offset) and a random 0/1 mask with
    at least one target after its first token."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = (i * 10_000 + np.arange(n)).astype(np.int32)
        mask = rng.integers(0, 2, n).astype(np.int32)
        mask[-1] = 1
        out.append((ids, mask))
    return out


def segments(rows):
    """(tokens, loss_mask) of every packed sequence, after checking the row invariants."""
    out = []
    for row in rows:
        assert set(row) == set(FIELDS)
        for k in FIELDS:
            assert row[k].dtype == np.int32 and row[k].ndim == 1
        seg, pos = row["segment_ids"], row["positions"]
        n_real = int((seg > 0).sum())
        # Segments are 1, 2, ... in order, contiguous, then padding (0) to the end.
        assert (seg[n_real:] == 0).all() and (seg[:n_real] > 0).all()
        assert (np.diff(seg[:n_real]) >= 0).all() and (np.diff(seg[:n_real]) <= 1).all() and seg[0] == 1
        pad = seg == 0
        assert (row["tokens"][pad] == 0).all() and (pos[pad] == 0).all() and (row["loss_mask"][pad] == 0).all()
        for s in range(1, int(seg.max()) + 1):
            idx = np.flatnonzero(seg == s)
            assert (pos[idx] == np.arange(len(idx))).all(), "positions restart at 0 in every segment"
            assert row["loss_mask"][idx[0]] == 0, "nothing predicts a segment's first token"
            out.append((row["tokens"][idx], row["loss_mask"][idx]))
    return out


def test_every_example_exactly_once_with_its_mask():
    examples = make_examples(np.random.default_rng(1).integers(2, 60, 300))
    rows, stats = pack_window(examples, seq_len=64)
    got = {int(t[0]) // 10_000: (t, m) for t, m in segments(rows)}
    assert len(got) == len(examples) == stats.examples and stats.rows == len(rows)
    for i, (ids, mask) in enumerate(examples):
        t, m = got[i]
        assert np.array_equal(t, ids)
        assert np.array_equal(m[1:], mask[1:]) and m[0] == 0
    assert stats.real_tokens == sum(len(e[0]) for e in examples)
    assert stats.efficiency == stats.real_tokens / (len(rows) * 64)


def segment_lengths(rows):
    return [[int((r["segment_ids"] == s).sum()) for s in range(1, r["segment_ids"].max() + 1)] for r in rows]


def test_rows_are_filled_exactly():
    # Best-fit-decreasing needs a third row: 8 and 7 share one (1 left), 6, 5 and 4 another (1 left), and
    # 2 fits neither. Filling row by row: each opens with the longest example left and is closed by the
    # most even pair that fills it exactly: 8 + (6 + 2), then 7 + (5 + 4).
    rows, stats = pack_window(make_examples([6, 8, 4, 7, 2, 5]), seq_len=16)
    assert segment_lengths(rows) == [[8, 6, 2], [7, 5, 4]]
    assert len(_best_fit_decreasing([6, 8, 4, 7, 2, 5], 16)) == 3
    assert stats.efficiency == 1.0


@pytest.mark.parametrize(
    "seq_len,low,high,n",
    [(64, 2, 64, 200), (64, 20, 40, 150), (100, 30, 60, 120), (256, 1, 300, 300), (32, 2, 9, 7), (512, 400, 600, 50)],
)
def test_every_mix_packs_validly_and_never_worse_than_best_fit_decreasing(seq_len, low, high, n):
    rng = np.random.default_rng(seq_len + n)
    for trial in range(3):
        lengths = rng.integers(low, high + 1, n)
        examples = make_examples(lengths, seed=trial)
        rows, stats = pack_window(examples, seq_len)
        got = sorted(int(t[0]) // 10_000 for t, _ in segments(rows))
        kept = [i for i, n in enumerate(lengths) if n >= 2]  # a 1-token example has no target
        assert got == kept and stats.examples == len(kept) and stats.rows == len(rows)
        fitted = [min(int(lengths[i]), seq_len) for i in kept]
        assert _lower_bound(fitted, seq_len) <= len(rows) <= len(_best_fit_decreasing(fitted, seq_len))


@pytest.mark.parametrize("over_long", ["truncate", "drop"])
def test_over_long_examples_are_truncated_or_dropped_and_counted(over_long):
    examples = make_examples([10, 40, 12, 33, 32])
    rows, stats = pack_window(examples, seq_len=32, over_long=over_long)
    segs = {int(t[0]) // 10_000: t for t, _ in segments(rows)}
    if over_long == "truncate":
        assert (stats.truncated, stats.dropped) == (2, 0)
        assert sorted(segs) == [0, 1, 2, 3, 4]
        assert np.array_equal(segs[1], examples[1][0][:32]) and np.array_equal(segs[3], examples[3][0][:32])
    else:
        assert (stats.truncated, stats.dropped) == (0, 2)
        assert sorted(segs) == [0, 2, 4]
    assert stats.examples == len(segs)


def test_examples_without_targets_are_dropped_and_counted():
    ids = np.arange(1, 9, dtype=np.int32)
    no_target = (ids[:4], np.zeros(4, np.int32))
    only_first = (ids[:4], np.eye(1, 4, dtype=np.int32)[0])  # its one target is the unpredictable first token
    late_target = (ids, np.eye(1, 8, 7, dtype=np.int32)[0])  # truncation to 4 cuts the target off
    rows, stats = pack_window([no_target, only_first, late_target, *make_examples([3])], seq_len=4)
    assert (stats.no_target, stats.truncated, stats.examples) == (3, 1, 1)
    assert len(rows) == 1


def test_efficiency_on_a_realistic_length_mix():
    # Log-normal lengths, median seq_len / 8, a long tail past seq_len (truncated): 99.73% measured.
    seq_len = 2048
    lengths = np.maximum(8, np.random.default_rng(0).lognormal(np.log(seq_len / 8), 1.0, 10_000)).astype(int)
    packer = Packer(seq_len, window=1000)
    rows = list(packer.pack(make_examples(lengths)))
    stats = packer.stats
    assert stats.efficiency >= 0.99, stats
    assert stats.truncated == int((lengths > seq_len).sum()) > 0
    assert stats.examples == len(lengths) and stats.rows == len(rows)
    assert stats.real_tokens == sum(int((r["segment_ids"] > 0).sum()) for r in rows)


def test_deterministic_and_window_by_window():
    examples = make_examples(np.random.default_rng(2).integers(1, 100, 250))
    a = list(Packer(128, window=100).pack(examples))
    b = list(Packer(128, window=100).pack(examples))
    by_window = [r for lo in range(0, 250, 100) for r in pack_window(examples[lo : lo + 100], 128)[0]]
    assert len(a) == len(b) == len(by_window)
    for x, y, z in zip(a, b, by_window, strict=True):
        for k in FIELDS:
            assert np.array_equal(x[k], y[k]) and np.array_equal(x[k], z[k])


def chat_like_lengths(n, seed):
    """Lengths like the demo chats tokenised with the demo BPE: 20 to 98 tokens, mean ~44, skewed short."""
    return (20 + np.minimum(78, np.random.default_rng(seed).gamma(2.0, 12.0, n))).astype(int)


@pytest.mark.parametrize(
    "lengths",
    [chat_like_lengths(5000, 0), np.random.default_rng(1).integers(20, 99, 5000)],
    ids=["chat-like", "uniform-20-98"],
)
def test_efficiency_on_short_chats(lengths):
    # Best-fit-decreasing left every row ~22 tokens short here (97-99%); filling rows exactly reaches the
    # lower bound, or one row above it, in every window.
    seq_len, window = 256, 1000
    packer = Packer(seq_len, window=window)
    rows = list(packer.pack(make_examples(lengths)))
    assert packer.stats.efficiency >= 0.99, packer.stats
    assert packer.stats.examples == len(lengths) and packer.stats.rows == len(rows)
    for lo in range(0, len(lengths), window):
        part = lengths[lo : lo + window].tolist()
        n_rows = len(pack_window(make_examples(part), seq_len)[0])
        assert n_rows <= _lower_bound(part, seq_len) + 1


def test_same_window_same_rows():
    # Twice in a row, and against rows recorded once: a resumed run re-packs a window and skips the rows it
    # had already used, so the packing of a given window must never change by accident.
    examples = make_examples(chat_like_lengths(1000, 7))
    first, _ = pack_window(examples, 256)
    again, _ = pack_window(examples, 256)
    assert len(first) == len(again)
    for x, y in zip(first, again, strict=True):
        for k in FIELDS:
            assert np.array_equal(x[k], y[k])
    placed = [int(t[0]) // 10_000 for t, _ in segments(first)]  # example indices, row after row
    assert (len(first), zlib.crc32(np.asarray(placed, "<i4").tobytes())) == (165, 1986422319)


def test_bad_arguments():
    with pytest.raises(ValueError, match="over_long"):
        Packer(16, over_long="wrap")
    with pytest.raises(ValueError, match="seq_len"):
        Packer(1)
    with pytest.raises(ValueError, match="shapes"):
        pack_window([(np.zeros(3, np.int32), np.zeros(2, np.int32))], 8)
