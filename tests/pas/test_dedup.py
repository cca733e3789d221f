"""Blocked near-duplicate removal against the brute-force greedy scan."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax.pas import dedup
from align_jax.pas.dedup import dedup_brute_force, dedup_mask
from align_jax.pas.embed import normalize_rows


def synthetic(n_base=240, dim=32, n_dups=60, seed=0):
    """Random base vectors plus noisy copies of some of them, placed later; returns (x, expected keep)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, dim)).astype(np.float32)
    src = rng.choice(n_base, n_dups, replace=False)
    dups = base[src] + 0.02 * rng.normal(size=(n_dups, dim)).astype(np.float32)
    x = np.concatenate([base, dups])
    perm = np.concatenate([np.arange(n_base), n_base + rng.permutation(n_dups)])
    x = x[perm]
    expected = np.r_[np.ones(n_base, bool), np.zeros(n_dups, bool)]
    return x, expected


def test_matches_brute_force_and_known_duplicates():
    x, expected = synthetic()
    threshold = 0.95
    sims = normalize_rows(x).astype(np.float64) @ normalize_rows(x).astype(np.float64).T
    # No similarity sits within float32 rounding of the threshold, so the answer is unambiguous.
    assert np.min(np.abs(sims - threshold)) > 1e-4
    ref = dedup_brute_force(x, threshold)
    np.testing.assert_array_equal(ref, expected)
    for block, chunk in ((64, 128), (7, 10), (512, 4096), (300, 300)):  # 300 rows: blocks that do not divide N
        np.testing.assert_array_equal(
            dedup_mask(x, threshold, block=block, chunk=chunk), ref, err_msg=f"{block=} {chunk=}"
        )


def test_greedy_keep_first_is_not_transitive():
    # 0 deg, 20 deg, 40 deg: 0~20 and 20~40 are close, 0 and 40 are not. The 20-degree one is dropped,
    # so the 40-degree one has no kept near-duplicate and stays (connected components would drop it).
    angles = np.deg2rad([0.0, 20.0, 40.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    threshold = float(np.cos(np.deg2rad(25.0)))
    np.testing.assert_array_equal(dedup_mask(x, threshold, block=2, chunk=2), [True, False, True])
    np.testing.assert_array_equal(dedup_brute_force(x, threshold), [True, False, True])


def test_threshold_edge_is_inclusive():
    # cos([1,0,0,0], [.5,.5,.5,.5]) is exactly 0.5 in float32 (both already unit length).
    x = np.array([[1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]], np.float32)
    np.testing.assert_array_equal(dedup_mask(x, 0.5), [True, False])
    np.testing.assert_array_equal(dedup_mask(x, float(np.nextafter(np.float32(0.5), np.float32(1)))), [True, True])


def test_zero_rows_and_scale_invariance():
    x = np.array([[0, 0, 0], [1, 2, 3], [10, 20, 30], [0, 0, 0], [-1, 0, 0]], np.float32)
    np.testing.assert_array_equal(dedup_mask(x, 0.99), [True, True, False, True, True])
    assert dedup_mask(np.zeros((0, 3), np.float32), 0.9).shape == (0,)


def test_one_compilation_for_many_blocks():
    x, _ = synthetic(n_base=200, n_dups=50, seed=1)
    dedup._dedup_block.clear_cache()
    dedup_mask(x, 0.9, block=32, chunk=64)  # 8 blocks
    dedup_mask(x[::-1].copy(), 0.9, block=32, chunk=64)  # same shapes, other data
    assert dedup._dedup_block._cache_size() == 1


def test_bad_threshold_and_input():
    with pytest.raises(ValueError, match="threshold"):
        dedup_mask(np.ones((2, 2)), 1.5)
    with pytest.raises(ValueError, match=r"row 1 is not finite"):
        dedup_mask(np.array([[1.0, 0.0], [np.nan, 1.0]]), 0.9)
