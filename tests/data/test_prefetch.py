"""The prefetcher changes when batches are made, never which, and its state is the consumer's."""

from __future__ import annotations

import pytest

from align_jax.data.prefetch import Prefetcher


class Counter:
    def __init__(self, fail_at=None):
        self.i, self.fail_at = 0, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"bad row at {self.i}")
        self.i += 1
        return {"batch": self.i}

    def state(self):
        return {"position": self.i}

    def restore(self, state):
        self.i = state["position"]


def test_same_batches_and_consumer_state():
    feed = Prefetcher(Counter(), depth=3)
    try:
        got = [next(feed)["batch"] for _ in range(5)]
        assert got == [1, 2, 3, 4, 5]
        # The producer has run ahead, but the state is where the consumer stands.
        assert feed.state() == {"position": 5}
        resumed = Counter()
        resumed.restore(feed.state())
        assert next(resumed) == {"batch": 6} == next(feed)
    finally:
        feed.close()


def test_initial_state_and_errors_reach_the_consumer():
    feed = Prefetcher(Counter(fail_at=2))
    try:
        assert feed.state() == {"position": 0}
        assert [next(feed), next(feed)] == [{"batch": 1}, {"batch": 2}]
        with pytest.raises(ValueError, match="bad row at 2"):
            next(feed)
    finally:
        feed.close()
