"""k-means, hierarchical k-means, diversity selection and category balance on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax.pas.cluster import hierarchical_kmeans, kmeans, select_per_cluster
from align_jax.pas.tags import balance


def blobs(centers, per, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + noise * rng.normal(size=(per, len(c))) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(len(centers)), per)


def same_partition(a, b):
    """True when labelings a and b group the points identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_blobs(seed):
    centers = 10 * np.eye(8)[:5]
    x, truth = blobs(centers, per=50, noise=0.3, seed=seed)  # 250 points: padded to 256 inside
    res = kmeans(x, 5, seed=seed)
    assert same_partition(res.labels, truth)
    # Converged centroids are the blob means, in the order of their labels.
    for c in range(5):
        np.testing.assert_allclose(res.centroids[c], x[res.labels == c].mean(0), atol=1e-4)
    expected_inertia = sum(((x[truth == t] - x[truth == t].mean(0)) ** 2).sum() for t in range(5))
    assert res.inertia == pytest.approx(expected_inertia, rel=1e-4)


def test_kmeans_is_seeded_and_blocked_assignment_agrees():
    x, _ = blobs(10 * np.eye(4), per=40, noise=1.0)
    a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = kmeans(x, 4, seed=3, block=16)  # 160 points in 10 assignment blocks: same computation
    np.testing.assert_array_equal(a.labels, c.labels)
    np.testing.assert_allclose(a.centroids, c.centroids, atol=1e-5)


def test_kmeans_clips_k_and_handles_duplicates():
    x = np.array([[0, 0], [0, 0], [1, 1]], np.float32)
    res = kmeans(x, 10)
    assert len(res.centroids) == 3 and res.inertia == pytest.approx(0.0, abs=1e-6)
    assert res.labels[0] == res.labels[1] != res.labels[2]


def test_hierarchical_kmeans_finds_sub_blobs_grouped_by_parent():
    tops = 20 * np.eye(6)[:3]
    offsets = 3 * np.eye(6)[3:5]
    centers = [t + o for t in tops for o in offsets]  # 3 groups of 2 sub-blobs
    x, truth = blobs(centers, per=30, noise=0.2, seed=4)
    res = hierarchical_kmeans(x, (3, 2), seed=0)
    assert same_partition(res.labels, truth)
    assert len(res.centroids) == 6
    parent_of_leaf = {leaf: t // 2 for leaf, t in zip(res.labels.tolist(), truth.tolist(), strict=True)}
    # Leaves are numbered parent by parent: leaves 2p and 2p + 1 share a parent.
    assert all(parent_of_leaf[2 * p] == parent_of_leaf[2 * p + 1] for p in range(3))


def test_select_nearest_and_spread():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [100.0], [101.0]], np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1])
    centroids = np.array([[3.25], [100.5]], np.float32)
    # Cluster 0: distances to 3.25 are 3.25, 2.25, 1.25, 6.75 -> nearest two are points 2 and 1.
    np.testing.assert_array_equal(select_per_cluster(x, labels, centroids, 2), [1, 2, 4, 5])
    # Spread: nearest (2), then farthest from it (10), then farthest from {2, 10} (0).
    np.testing.assert_array_equal(select_per_cluster(x, labels, centroids, 3, how="spread"), [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(select_per_cluster(x, labels, centroids, 10), np.arange(6))
    with pytest.raises(ValueError, match="how"):
        select_per_cluster(x, labels, centroids, 2, how="random")


def test_balance_caps_each_category():
    cats = ["a", "a", "a", "b", "b", "c"]
    np.testing.assert_array_equal(balance(cats, 2), [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(balance(cats, None), np.arange(6))
    # Higher priority wins inside a category; NaN ranks last.
    np.testing.assert_array_equal(balance(cats, 1, [0.1, 0.9, 0.5, np.nan, 0.2, 0.0]), [1, 4, 5])
    # A mapping caps only the categories it names.
    np.testing.assert_array_equal(balance(cats, {"a": 1, "c": 0}), [0, 3, 4])
