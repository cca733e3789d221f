"""Host-side batches prepared in a background thread while the device runs the previous step.

Tokenising and packing a window of examples takes a few hundred milliseconds of Python; in the step
loop's thread that is a stall every few steps. Here a thread keeps `depth` batches ready. Each batch
travels with the iterator state taken right after it, and `state()` returns the state of the last
batch handed out, so a checkpoint records exactly what the steps consumed, not what was prefetched.
"""

from __future__ import annotations

import queue
import threading
from typing import Any


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Wraps an iterator that has `state()` (and optionally `stats()`); iterate it instead."""

    def __init__(self, iterator: Any, depth: int = 2):
        self._it = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._state = iterator.state()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="align_jax-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                item = (next(self._it), self._it.state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self._queue.put(_Failure(e))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        batch, self._state = item
        return batch

    def state(self) -> dict:
        """The iterator state after the last batch returned by `next`."""
        return self._state

    def stats(self) -> dict:
        return self._it.stats() if hasattr(self._it, "stats") else {}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
