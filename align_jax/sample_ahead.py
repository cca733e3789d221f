"""Rollouts sampled ahead: the samples for rollout k+s are drawn while rollout k's update trains.

Rollout dominates RL, and sampling does not need the newest params: with `rollout_staleness` s > 0 the
GRPO stage hands the sampling of the next rollout to a background thread, from a snapshot of the params
it has now, and the update of the current rollout runs meanwhile. Samples are then s updates old; the
trainer scores them under its current params (old_logp) and the sampler's own log-probs (sampler_logp)
say how far behind they are, which truncated importance sampling (`tis_cap`) corrects for.

With s = 0 nothing runs in the background: `get` samples there and then, exactly as a synchronous
rollout does. The jobs run one at a time, in the order they were asked for, on one daemon thread, so
which prompts and seeds a rollout gets does not depend on timing, and an unfinished job never keeps the
process alive at exit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


class _Worker:
    """One daemon thread running submitted jobs in order."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="align_jax-sample-ahead", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            future, fn, args = self.jobs.get()
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # surfaced by future.result() in the training thread
                future.set_exception(e)


class SampleAhead:
    """`get(params, count)` -> the samples of rollout `count`: `sample(params, count)` run now (staleness 0,
    or nothing in flight yet) or the result of the job submitted `staleness` rollouts ago. Each call then
    submits the job for rollout count + staleness with a copy of `params` (the train step donates the
    state's buffers, so the sampler must not share them)."""

    def __init__(self, sample: Callable[[Any, int], Any], staleness: int):
        if staleness < 0:
            raise ValueError(f"rollout_staleness={staleness} must be >= 0")
        self.sample, self.staleness = sample, staleness
        self.pending: collections.deque[tuple[concurrent.futures.Future, int]] = collections.deque()
        self.worker = _Worker() if staleness else None

    def get(self, params: Any, count: int) -> tuple[Any, int]:
        """(samples of rollout `count`, how many rollouts older than `params` the params that drew them are)."""
        if not self.staleness:
            return self.sample(params, count), 0
        if self.pending:
            future, drawn_at = self.pending.popleft()
            result, age = future.result(), count - drawn_at
        else:
            result, age = self.sample(params, count), 0  # the first rollout (or the first after a resume)
        while len(self.pending) < self.staleness:
            snapshot = jax.tree.map(jnp.copy, params)
            job = count + 1 + len(self.pending)
            self.pending.append((self.worker.submit(self.sample, snapshot, job), count))
        return result, age
