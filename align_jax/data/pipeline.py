"""The SFT loader: source rows -> canonical chats -> tokens + loss masks -> packed rows -> host batches.

Train (`SFTIterator`, endless):
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

Eval (`EvalBatches`, finite, re-iterable): every host tokenises and packs the whole eval set in file order
(eval sets are small), pads the rows to whole global batches with empty rows, and takes its slice of each.
Reading everything on every host is what guarantees all hosts agree on the number of eval batches
without talking to each other; with a sharded split they would not, and a multi-host eval would hang.

The machinery is generic over what a window of row indices becomes (`WindowPacker`): `ShuffledBatches`
and `OrderedBatches` are the train and eval halves, `SFTIterator` and `EvalBatches` bind them to SFT
chats, and preference.py binds them to chosen/rejected pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import jax
import numpy as np

from align_jax.data.formats import FORMATS, BadRowError, to_record
from align_jax.data.packing import (
    OVER_LONG,
    PACKER_VERSION,
    Example,
    PackingStats,
    Row,
    empty_rows,
    pack_window,
)
from align_jax.data.sources import RowSource, open_source
from align_jax.data.tokenize import LOSS_ON, TemplateError, end_of_turn_ids, tokenize_chat

logger = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
STATE_VERSION = 1
# Bad rows logged one by one in skip mode; after that only counted (see `stats()`).
MAX_LOGGED_BAD_ROWS = 5
Batch = dict[str, np.ndarray]
ConfigT = TypeVar("ConfigT", bound="DataConfigMixin")


class DataConfigMixin:
    """What the data configs (frozen dataclasses) share: key checking and construction from any mapping."""

    def _check(self, choices: Mapping[str, Sequence[Any]], minimums: Mapping[str, int]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name}={value!r}; expected an integer >= {low}")

    @classmethod
    def from_any(cls: type[ConfigT], cfg: Any = None, **overrides: Any) -> ConfigT:
        """From an instance, a dict, or an ml_collections ConfigDict (plus keyword overrides).
        Unknown keys fail here, with the known ones listed, rather than being silently ignored."""
        if cfg is None:
            values: dict[str, Any] = {}
        elif isinstance(cfg, cls):
            values = dataclasses.asdict(cfg)  # type: ignore[call-overload]
        elif hasattr(cfg, "to_dict"):
            values = cfg.to_dict()
        elif isinstance(cfg, Mapping):
            values = dict(cfg)
        else:
            raise TypeError(f"data config must be a dict, ConfigDict or {cls.__name__}, got {type(cfg).__name__}")
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(DataConfigMixin):
    """What the SFT data pipeline reads. `batch_size` is global, in packed rows of `seq_len` tokens."""

    train: Any = None  # a source spec (see sources.open_source): path, glob, list of paths, dataset name, tfds:...
    eval: Any = None
    format: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    loss_on: str = "assistant"
    over_long: str = "truncate"
    on_bad_row: str = "error"
    shuffle_seed: int = 0
    pack_window: int = 1000

    def __post_init__(self) -> None:
        self._check(
            {"format": FORMATS, "loss_on": LOSS_ON, "over_long": OVER_LONG, "on_bad_row": ON_BAD_ROW},
            {"seq_len": 2, "batch_size": 1, "pack_window": 1, "shuffle_seed": 0},
        )


class BadRows:
    """The on_bad_row policy: "error" raises the BadRowError; "skip" counts it in `stats["bad_rows"]` and
    logs the first MAX_LOGGED_BAD_ROWS. `stats=None` replays silently (a resumed window whose bad rows
    were already counted and logged)."""

    def __init__(self, on_bad_row: str):
        self.on_bad_row = on_bad_row
        self.logged = 0
        # False on a later epoch's pass over the same rows: `bad_rows` counts distinct rows, not visits.
        self.counting = True

    def handle(self, error: BadRowError, stats: dict[str, int] | None) -> None:
        if self.on_bad_row == "error":
            raise error
        if stats is not None and self.counting:
            stats["bad_rows"] += 1
            if self.logged < MAX_LOGGED_BAD_ROWS:
                self.logged += 1
                more = " (further bad rows are only counted)" if self.logged == MAX_LOGGED_BAD_ROWS else ""
                logger.warning("skipping bad row: %s%s", error, more)


def add_packing_stats(stats: dict[str, int] | None, pstats: PackingStats) -> None:
    if stats is not None:
        for k, v in dataclasses.asdict(pstats).items():
            stats[k] += v


class WindowPacker(Protocol):
    """What a window of row indices becomes: the rows `pack` returns are a pure function of the indices
    (in order); `settings` are the values that change them (a resumed position needs them unchanged);
    `empty(n)` is `n` stacked all-padding rows (no targets) that pad a final eval batch."""

    source: RowSource
    bad_rows: BadRows

    def pack(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Row]: ...

    def settings(self) -> dict[str, Any]: ...

    def empty(self, n: int) -> Batch: ...


class _Examples:
    """Reads rows by index and turns them into tokenised examples, applying the bad-row policy."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig):
        self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.bad_rows = BadRows(cfg.on_bad_row)

    def read(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Example]:
        """Examples for `indices`, in order, without the bad rows. `stats=None` replays silently (a
        resumed window whose bad rows were already counted and logged)."""
        out = []
        for raw, origin in self.source.read(indices):
            try:
                if isinstance(raw, BadRowError):
                    raise raw
                record = to_record(raw, self.cfg.format, origin)
            except BadRowError as e:
                self.bad_rows.handle(e, stats)
                continue
            try:
                out.append(tokenize_chat(self.tokenizer, record["messages"], self.cfg.loss_on, self.eot_ids))
            except TemplateError as e:
                raise TemplateError(f"{origin}: {e}") from e
        return out

    def pack(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Row]:
        rows, pstats = pack_window(self.read(indices, stats), self.cfg.seq_len, self.cfg.over_long)
        add_packing_stats(stats, pstats)
        return rows

    def settings(self) -> dict[str, Any]:
        return {"loss_on": self.cfg.loss_on}

    def empty(self, n: int) -> Batch:
        return empty_rows(n, self.cfg.seq_len)


def _new_stats() -> dict[str, int]:
    return {"bad_rows": 0, **dataclasses.asdict(PackingStats()), "batches": 0}


def _report(stats: dict[str, int], **extra: Any) -> dict[str, Any]:
    efficiency = stats["real_tokens"] / stats["slots"] if stats["slots"] else 0.0
    return {**stats, "packing_efficiency": efficiency, **extra}


def _host_batch_size(cfg: Any, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes")
    return cfg.batch_size // process_count


def _stack(rows: Sequence[Row]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class ShuffledBatches:
    """Endless, shuffled, host-sharded, resumable iterator of this host's batches (see module doc) of the
    rows a WindowPacker makes. `cfg` needs batch_size, shuffle_seed, pack_window, seq_len, format, over_long."""

    def __init__(self, windows: WindowPacker, cfg: Any, process_index: int, process_count: int):
        host_batch = _host_batch_size(cfg, process_count)
        source = windows.source
        if len(source) < process_count:
            raise ValueError(f"{source.name}: {len(source)} rows cannot be shared by {process_count} processes")
        self.cfg = cfg
        self.host_batch = host_batch
        self.process_index, self.process_count = process_index, process_count
        self._examples = windows
        self._num_rows = len(source)
        self._epoch, self._window, self._rows_done = 0, 0, 0
        self._stats = _new_stats()
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
            if self._rows is None:
                self._rows = self._pack_current(count=not self._replay)
                self._replay = False
                if self._rows_done > len(self._rows):
                    raise ValueError(f"resumed at row {self._rows_done}, past the {len(self._rows)} rows of its window")
            if self._rows_done < len(self._rows):
                k = min(self.host_batch - len(taken), len(self._rows) - self._rows_done)
                taken += self._rows[self._rows_done : self._rows_done + k]
                self._rows_done += k
                empty_windows = 0
                continue
            empty_windows += 1
            if empty_windows > len(self._windows) + 1:
                raise ValueError(
                    f"{self._examples.source.name}: a whole epoch gave no usable example on process "
                    f"{self.process_index} (stats: {self.stats()})"
                )
            self._advance()
        self._stats["batches"] += 1
        return _stack(taken)

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
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; this code reads {STATE_VERSION}")
        ours, theirs = self._settings(), dict(state["settings"])
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume the data iterator exactly: these settings differ from the saved state "
                f"(saved, now): {diff}"
            )
        self._epoch, self._window, self._rows_done = int(state["epoch"]), int(state["window"]), int(state["rows_done"])
        self._windows = self._epoch_windows(self._epoch)
        if not 0 <= self._window < len(self._windows):
            raise ValueError(f"saved window {self._window} out of range for epoch {self._epoch}")
        self._stats = {**_new_stats(), **{k: int(v) for k, v in state["stats"].items()}}
        # The window is re-read on the next batch; if it had been read before the save, the saved stats
        # already count it (and its bad rows were logged), so the re-read is silent.
        self._rows, self._replay = None, bool(state["window_read"])

    def stats(self) -> dict[str, Any]:
        """Counts so far, for logging: examples, bad_rows (skipped), truncated, dropped, no_target, rows,
        packing_efficiency, batches, epoch."""
        return _report(self._stats, epoch=self._epoch)


class SFTIterator(ShuffledBatches):
    """The SFT train loader. Yields {tokens, positions, segment_ids, loss_mask}, each int32
    [batch_size / process_count, seq_len]."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig, process_index: int, process_count: int):
        super().__init__(_Examples(source, tokenizer, cfg), cfg, process_index, process_count)


class OrderedBatches:
    """One ordered pass over a split as this host's batches; `len()` is the same on every host and
    iterating again starts over. The final global batch is filled up with empty rows (no targets).

    `cache=True` keeps the packed rows (eval sets are small); `cache=False` streams window by window and
    keeps nothing (a pass over a whole train split); `len()` then costs one extra pass, once."""

    def __init__(self, windows: WindowPacker, cfg: Any, process_index: int, process_count: int, cache: bool = True):
        host_batch = _host_batch_size(cfg, process_count)
        self.cfg = cfg
        self.host_batch = host_batch
        self.process_index = process_index
        self._examples = windows
        self._num_rows = len(windows.source)
        self._cache = cache
        self._rows: list[Row] | None = None
        self._num_packed: int | None = None  # rows in the whole pass, once one pass has counted them
        self._stats = _new_stats()

    def _pass(self) -> Iterator[Row]:
        order = np.arange(self._num_rows)
        windows = np.array_split(order, max(1, round(self._num_rows / self.cfg.pack_window)))
        # Only the first whole pass counts (and logs); the later ones replay the same windows silently.
        stats = _new_stats() if self._num_packed is None else None
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
        batch = _stack(mine)
        return {k: np.concatenate([batch[k], pad[k]]) for k in batch}

    def stats(self) -> dict[str, Any]:
        return _report(self._stats, batches=len(self))


class EvalBatches(OrderedBatches):
    """The SFT eval loader: the whole eval set, in file order, packed once and kept."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig, process_index: int, process_count: int):
        super().__init__(_Examples(source, tokenizer, cfg), cfg, process_index, process_count)


def make_sft_iterator(
    data_cfg: Any,
    tokenizer: Any,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> SFTIterator | EvalBatches:
    """The loader for `split` ("train": endless `SFTIterator`; "eval": finite `EvalBatches`).

    `data_cfg` is an SFTDataConfig, dict or ConfigDict with the SFTDataConfig keys. Process index and
    count default to jax's; pass them to simulate hosts (tests) or to split differently."""
    cfg = SFTDataConfig.from_any(data_cfg)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    spec = cfg.train if split == "train" else cfg.eval
    if spec is None or spec == "":
        raise ValueError(f"data.{split} is not set: give a file, glob, dataset name or tfds:NAME/SPLIT")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    # A dataset name without a split reads "train" for training; for eval the split must be named.
    source = open_source(spec, split="train" if split == "train" else None)
    cls = SFTIterator if split == "train" else EvalBatches
    return cls(source, tokenizer, cfg, process_index, process_count)


def global_batch(host_batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles each host's slice into global arrays [global batch, T] laid out by `sharding` (the data
    sharding: batch over the data axes). Every host must call it with its own slice, same shapes."""
    out = {}
    for name, value in host_batch.items():
        try:
            out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
        except ValueError as e:
            raise ValueError(f"batch field {name!r} of host shape {np.shape(value)}: {e}") from e
    return out


def gather_host_states(state: Mapping[str, Any]) -> dict[str, Any]:
    """Every host's iterator state in one JSON-able dict, for the checkpoint (which only the primary
    host writes). Each host's stream position differs, so all of them must be saved."""
    mine = json.dumps(state, sort_keys=True).encode()
    if jax.process_count() == 1:
        return {"hosts": [json.loads(mine)]}
    from jax.experimental import multihost_utils

    # Fixed-size rows for the all-gather: the longest state, rounded up, padded with spaces.
    longest = int(multihost_utils.process_allgather(np.array([len(mine)], np.int32)).max())
    width = -(-longest // 256) * 256
    buf = np.frombuffer(mine.ljust(width, b" "), np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(jax.process_count(), width)
    return {"hosts": [json.loads(bytes(row).decode()) for row in rows]}


def host_state(saved: Mapping[str, Any], process_index: int | None = None) -> dict[str, Any]:
    """This host's entry of `gather_host_states`' output."""
    hosts = saved.get("hosts")
    if not isinstance(hosts, list):
        raise ValueError("data state in the checkpoint has no 'hosts' list (written by an older align_jax?)")
    process_index = jax.process_index() if process_index is None else process_index
    if len(hosts) != jax.process_count():
        raise ValueError(
            f"the checkpoint holds the data position of {len(hosts)} hosts; this run has {jax.process_count()}. "
            "Resuming exactly needs the same number of hosts."
        )
    return dict(hosts[process_index])
