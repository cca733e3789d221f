"""What crosses hosts: each host's batch slice assembled into global arrays, and every host's iterator
state gathered into one checkpointable dict (and this host's entry read back on resume)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


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
