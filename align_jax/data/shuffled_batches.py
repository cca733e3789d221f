"""The train loader's machinery: an endless, shuffled, host-sharded and exactly resumable stream of this
host's batches of the rows a `WindowPacker` makes.

Order:
  * epoch e visits every row once, in the order `permutation(N)` seeded by (shuffle_seed, e); host p of
    P takes every P-th index of it, so hosts read disjoint shares that together cover the data;
  * a host's share is cut into windows of ~pack_window examples; each window is tokenised and packed on
    its own (packing.py) and its rows are shuffled (seeded by seed, epoch, window, host);
  * batches are consecutive runs of `batch_size / P` rows from that stream, crossing window and epoch
    boundaries freely. Each host moves to its next epoch when its own share runs out, so every host
    always has a next batch and no host ever waits for another.

Resuming: a window's rows are a pure function of (seed, epoch, window, host), so the position
`(epoch, window, rows_done)` says exactly where the stream stands. `state()` returns it (plus the
cumulative stats and the settings that must match); after `restore()` the next batch re-reads,
re-tokenises and re-packs only that one window and skips its first `rows_done` rows. The state is per
host: save each host's. Take it right after the batch it follows was taken (a prefetching consumer
must keep each batch's state with it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from align_jax.data.packing import PACKER_VERSION, Row
from align_jax.data.window_packer import (
    Batch,
    WindowPacker,
    host_batch_size,
    new_stats,
    report_stats,
    stack_rows,
)

STATE_VERSION = 1


class ShuffledBatches:
    """Endless, shuffled, host-sharded, resumable iterator of this host's batches (see module doc) of the
    rows a WindowPacker makes. `cfg` needs batch_size, shuffle_seed, pack_window, seq_len, format, over_long."""

    def __init__(self, windows: WindowPacker, cfg: Any, process_index: int, process_count: int):
        host_batch = host_batch_size(cfg, process_count)
        source = windows.source
        if len(source) < process_count:
            raise ValueError(f"{source.name}: {len(source)} rows cannot be shared by {process_count} processes")
        self.cfg = cfg
        self.host_batch = host_batch
        self.process_index, self.process_count = process_index, process_count
        self._examples = windows
        self._num_rows = len(source)
        self._epoch, self._window, self._rows_done = 0, 0, 0
        self._stats = new_stats()
        self._windows: list[np.ndarray] = self._epoch_windows(0)
        self._rows: list[Row] | None = None  # the current window's rows, packed on demand
        self._replay = False  # the next pack re-reads a window whose stats are already counted

    # -- the deterministic order -------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This host's row indices for `epoch`, in visiting order (every host draws the same global
        permutation and takes every process_count-th entry)."""
        perm = np.random.default_rng([self.cfg.shuffle_seed, epoch]).permutation(self._num_rows)
        return perm[self.process_index :: self.process_count]

    def _epoch_windows(self, epoch: int) -> list[np.ndarray]:
        order = self.epoch_order(epoch)
        # Near-equal windows instead of full ones plus a stub: a tiny last window would pack poorly.
        return np.array_split(order, max(1, round(len(order) / self.cfg.pack_window)))

    def _pack_current(self, count: bool) -> list[Row]:
        # Every epoch visits every row once (over all hosts), so epoch 0 has seen each bad row already.
        self._examples.bad_rows.counting = self._epoch == 0
        rows = self._examples.pack(self._windows[self._window].tolist(), self._stats if count else None)
        # BFD emits rows longest-first; shuffle so a batch is not all long (or all short) examples.
        seed = [self.cfg.shuffle_seed, self._epoch, self._window, self.process_index]
        return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]

    # -- iteration ---------------------------------------------------------------------------------

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> Batch:
        taken: list[Row] = []
        empty_windows = 0
        while len(taken) < self.host_batch:
            rows = self._current_rows()
            if self._rows_done < len(rows):
                taken += self._take(rows, self.host_batch - len(taken))
                empty_windows = 0
                continue
            # Windows passed in a row without a usable row (all bad, dropped or no target): a whole epoch of
            # them means no batch can ever come, so stop rather than loop forever.
            empty_windows += 1
            if empty_windows > len(self._windows) + 1:
                raise ValueError(
                    f"{self._examples.source.name}: a whole epoch gave no usable example on process "
                    f"{self.process_index} (stats: {self.stats()})"
                )
            self._advance()
        self._stats["batches"] += 1
        return stack_rows(taken)

    def _current_rows(self) -> list[Row]:
        """The current window's rows, packed on first use: silently when a restore says the saved stats
        already count this window."""
        if self._rows is None:
            self._rows = self._pack_current(count=not self._replay)
            self._replay = False
            if self._rows_done > len(self._rows):
                raise ValueError(f"resumed at row {self._rows_done}, past the {len(self._rows)} rows of its window")
        return self._rows

    def _take(self, rows: list[Row], wanted: int) -> list[Row]:
        """Up to `wanted` of the window's rows from where the stream stands, moving the position past them."""
        k = min(wanted, len(rows) - self._rows_done)
        out = rows[self._rows_done : self._rows_done + k]
        self._rows_done += k
        return out

    def _advance(self) -> None:
        self._window += 1
        if self._window == len(self._windows):
            self._epoch += 1
            self._window = 0
            self._windows = self._epoch_windows(self._epoch)
        self._rows, self._rows_done = None, 0

    # -- state -------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        # Everything that changes which rows the stream holds; a resume under other values cannot be exact.
        c = self.cfg
        return {
            "num_rows": self._num_rows,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "shuffle_seed": c.shuffle_seed,
            "seq_len": c.seq_len,
            "pack_window": c.pack_window,
            "format": c.format,
            "over_long": c.over_long,
            "packer": PACKER_VERSION,
            # on_bad_row is left out on purpose: after a run stops on a bad row, resuming with "skip" is
            # exact (no row was skipped before), and it is the natural fix.
            **self._examples.settings(),
        }

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next batch starts at row `rows_done` of window `window` of
        epoch `epoch` of this host's stream (`window_read`: whether that window was already read, and so
        counted in `stats`). Also the cumulative stats and the settings that must match."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "window": self._window,
            "rows_done": self._rows_done,
            "window_read": self._rows is not None or self._replay,
            "settings": self._settings(),
            "stats": dict(self._stats),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues exactly where `state()` was taken: the next batch is the one that came next then."""
        self._check_resumable(state)
        self._epoch, self._window, self._rows_done = int(state["epoch"]), int(state["window"]), int(state["rows_done"])
        self._windows = self._epoch_windows(self._epoch)
        if not 0 <= self._window < len(self._windows):
            raise ValueError(f"saved window {self._window} out of range for epoch {self._epoch}")
        self._stats = {**new_stats(), **{k: int(v) for k, v in state["stats"].items()}}
        # The window is re-read on the next batch; if it had been read before the save, the saved stats
        # already count it (and its bad rows were logged), so the re-read is silent.
        self._rows, self._replay = None, bool(state["window_read"])

    def _check_resumable(self, state: Mapping[str, Any]) -> None:
        """Refuses a state this code cannot continue exactly: another state version, or other settings."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        ours, theirs = self._settings(), dict(state["settings"])
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume the data iterator exactly: these settings differ from the saved state "
                f"(saved, now): {diff}"
            )

    def stats(self) -> dict[str, Any]:
        """Counts so far, for logging: examples, bad_rows (skipped), truncated, dropped, no_target, rows,
        packing_efficiency, batches, epoch."""
        return report_stats(self._stats, epoch=self._epoch)


class ShardedBatches:
    """Several shard streams of one process, read side by side: each batch is their batches concatenated
    in shard order. The train stream is `data_shards` ShuffledBatches streams (shard s: index s of that
    many; align_jax/data/multihost.py); process p of P reads shards p*K/P .. (p+1)*K/P - 1, so one process
    reading all K shards yields exactly the global batches (rows in order) that K processes read together.
    `state()` holds each shard's position; the other attributes (the preference loader's `num_rows`,
    `score_stats()`, ...) are the first shard's, which all shards share."""

    def __init__(self, streams: list[ShuffledBatches]):
        if not streams:
            raise ValueError("ShardedBatches needs at least one shard stream")
        self.streams = streams
        self.host_batch = sum(s.host_batch for s in streams)

    def __getattr__(self, name: str) -> Any:
        if name == "streams":  # not set yet (copy, unpickling): no delegation loop
            raise AttributeError(name)
        return getattr(self.streams[0], name)

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self) -> Batch:
        batches = [next(s) for s in self.streams]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def state(self) -> dict[str, Any]:
        return {"shards": [s.state() for s in self.streams]}

    def restore(self, state: Mapping[str, Any]) -> None:
        shards = state.get("shards") if isinstance(state, Mapping) else None
        if not isinstance(shards, list) or len(shards) != len(self.streams):
            have = len(shards) if isinstance(shards, list) else 1
            raise ValueError(
                f"cannot resume the data iterator exactly: the saved state holds {have} data shard(s) for this "
                f"process, this run reads {len(self.streams)} (set ALIGN_JAX_DATA_SHARDS as the saved run did)"
            )
        for stream, saved in zip(self.streams, shards, strict=True):
            stream.restore(saved)

    def stats(self) -> dict[str, Any]:
        total = new_stats()
        for s in self.streams:
            for k, v in s._stats.items():
                total[k] += v
        total["batches"] = self.streams[0]._stats["batches"]  # batches of this process, not of each shard
        return report_stats(total, epoch=min(s._epoch for s in self.streams))
