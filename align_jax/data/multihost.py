"""What crosses hosts: each host's batch slice assembled into global arrays, every host's iterator state
gathered into one checkpointable dict (and this host's entry read back on resume), this host's rows of a
global array, and the data shards each process reads.

Data shards. The train stream is read as K shard streams (align_jax/data/shuffled_batches.py: shard s of
K reads every K-th row of each epoch's permutation and packs its own windows); a global batch is
batch_size / K rows of each, in shard order. Process p of P reads shards p*K/P .. (p+1)*K/P - 1, which
are exactly the rows of the global batch its devices hold (`host_rows`). K is one per process unless
ALIGN_JAX_DATA_SHARDS says otherwise (a multiple of the process count): the data a run trains on depends
on K, not on P, so a 1-process run with ALIGN_JAX_DATA_SHARDS=2 sees the very batches of a 2-process run.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

DATA_SHARDS_ENV = "ALIGN_JAX_DATA_SHARDS"


def data_shards(process_count: int, environ: Mapping[str, str] | None = None) -> int:
    """K, the number of shard streams the train data is read as: ALIGN_JAX_DATA_SHARDS, else one per process."""
    env = os.environ if environ is None else environ
    value = env.get(DATA_SHARDS_ENV, "").strip()
    if not value or value == "0":
        return process_count
    try:
        shards = int(value)
    except ValueError:
        shards = -1
    if shards < 1 or shards % process_count:
        raise ValueError(f"{DATA_SHARDS_ENV}={value!r}: expected a multiple of the {process_count} processes")
    return shards


def sharded_stream(make: Callable[[int, int], Any], process_index: int, process_count: int) -> Any:
    """This process's train stream: `make(shard, shards)` for each of its data shards (module doc), one
    stream as it is when it reads one shard, else their ShardedBatches."""
    from align_jax.data.shuffled_batches import ShardedBatches

    shards = data_shards(process_count)
    if shards == process_count:
        return make(process_index, process_count)
    per = shards // process_count
    return ShardedBatches([make(s, shards) for s in range(process_index * per, (process_index + 1) * per)])


def host_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """[lo, hi): the rows of a global batch of `shape` that this process's devices hold under `sharding`.
    The loaders give process p rows p*rows/P .. (p+1)*rows/P - 1; a mesh whose device order gives a
    process rows apart, or the batch replicated across processes, is an error naming what it found."""
    rows = shape[0]
    p, count = jax.process_index(), jax.process_count()
    if count == 1:
        return 0, rows
    indices = sharding.addressable_devices_indices_map(tuple(shape)).values()
    spans = sorted({(ix[0].start or 0, rows if ix[0].stop is None else ix[0].stop) for ix in indices})
    lo, hi = spans[0][0], spans[-1][1]
    per = rows // count
    contiguous = all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    if (lo, hi) != (p * per, (p + 1) * per) or not contiguous:
        raise ValueError(
            f"process {p} of {count} holds batch rows {spans} of {rows} under {sharding}; the loaders give it rows "
            f"{p * per}..{(p + 1) * per - 1}. Put the mesh's batch axes (data, fsdp, expert) across the processes "
            "(the default device order does)"
        )
    return lo, hi


def local_rows(x: jax.Array | np.ndarray, rows: tuple[int, int] | None = None) -> np.ndarray:
    """This process's rows [lo, hi) of a global array (all of it on one process), as numpy, read from the
    shards this process holds (however the array is laid out, replicated included)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        out = np.asarray(jax.device_get(x))
        return out if rows is None else out[rows[0] : rows[1]]
    if rows is None:
        raise ValueError("local_rows of an array that spans processes needs the rows this process holds")
    lo, hi = rows
    out = np.empty((hi - lo, *x.shape[1:]), x.dtype)
    filled = np.zeros((hi - lo, *x.shape[1:]), bool)
    for shard in x.addressable_shards:
        index = shard.index
        first = index[0] if index else slice(None)
        start, stop = first.start or 0, x.shape[0] if first.stop is None else first.stop
        a, b = max(start, lo), min(stop, hi)
        if a >= b:
            continue
        data = np.asarray(shard.data)
        where = (slice(a - lo, b - lo), *index[1:])
        out[where] = data[a - start : b - start]
        filled[where] = True
    if not filled.all():
        raise ValueError(f"this process holds only part of rows {lo}..{hi - 1} of an array sharded as {x.sharding}")
    return out


def all_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-process array, concatenated in process order (the global rows)."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    if local.dtype.itemsize == 8:  # JAX moves no 64-bit values by default: as pairs of 32-bit words, bit-exact
        words = np.ascontiguousarray(local).view(np.uint32).reshape(*local.shape, 2)
        return np.asarray(multihost_utils.process_allgather(words, tiled=True)).view(local.dtype)[..., 0]
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def global_value(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of a (global) array, on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


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
