"""The SFT loader: source rows -> canonical chats -> tokens + loss masks -> packed rows -> host batches.

Train (`SFTIterator`, endless): every epoch visits every row once in a seeded permutation, each host
reading its own disjoint share, packed window by window and shuffled; its position is
`(epoch, window, rows_done)`, which `state()` returns and `restore()` continues from exactly, re-packing
only one window. Eval (`EvalBatches`, finite, re-iterable): every host packs the whole eval set in file
order and takes its slice of each global batch, so all hosts agree on the number of batches.

The machinery is generic over what a window of row indices becomes (`WindowPacker`): `ShuffledBatches`
and `OrderedBatches` are the train and eval halves, `SFTIterator` and `EvalBatches` bind them to SFT
chats, and preference.py binds them to chosen/rejected pairs. It lives in:

  data_config.py       DataConfigMixin: key checking and construction shared by the data configs
  window_packer.py     the WindowPacker protocol, the on_bad_row policy (BadRows), shared stats helpers
  shuffled_batches.py  ShuffledBatches: the endless, shuffled, host-sharded, resumable train stream
  ordered_batches.py   OrderedBatches: one ordered pass, the same number of batches on every host
  sft_loader.py        SFTDataConfig, SFTIterator, EvalBatches, make_sft_iterator
  multihost.py         global_batch, gather_host_states, host_state, host_rows, local_rows, data shards

This module re-exports every one of those names, so `align_jax.data.pipeline` stays the one place the
stages, the evaluation, preference.py and the tests import them from.
"""

from align_jax.data.data_config import ConfigT, DataConfigMixin
from align_jax.data.multihost import gather_host_states, global_batch, host_rows, host_state, local_rows
from align_jax.data.ordered_batches import OrderedBatches
from align_jax.data.sft_loader import EvalBatches, SFTDataConfig, SFTIterator, make_sft_iterator
from align_jax.data.shuffled_batches import STATE_VERSION, ShardedBatches, ShuffledBatches
from align_jax.data.window_packer import (
    MAX_LOGGED_BAD_ROWS,
    ON_BAD_ROW,
    BadRows,
    Batch,
    WindowPacker,
    add_packing_stats,
    logger,
)

__all__ = [
    "MAX_LOGGED_BAD_ROWS",
    "ON_BAD_ROW",
    "STATE_VERSION",
    "BadRows",
    "Batch",
    "ConfigT",
    "DataConfigMixin",
    "EvalBatches",
    "OrderedBatches",
    "SFTDataConfig",
    "SFTIterator",
    "ShardedBatches",
    "ShuffledBatches",
    "WindowPacker",
    "add_packing_stats",
    "gather_host_states",
    "global_batch",
    "host_rows",
    "host_state",
    "local_rows",
    "logger",
    "make_sft_iterator",
]
