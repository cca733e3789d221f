"""Reference log-probs computed once before DPO training and cached on disk.

Every DPO-family step needs the frozen reference model's log-prob of each chosen and rejected response.
Those never change during training, so instead of a reference forward pass inside every step (a third
more FLOPs, and the reference's weights held in memory), they can be computed in one pass over the
data, stored per example, and attached to each batch as `ref_logps` [B, 2P] in the batch's layout.

The cache is one .npy table per data split: row i holds (chosen, rejected) log-prob sums of source row
i (`example_id`), NaN for rows that never reach a batch (bad or dropped). Its file name is a hash of
everything the numbers depend on: the data (file contents), the tokenizer (vocabulary, special tokens,
chat template), the settings that change what is tokenised (format, seq_len, over_long, unpaired), and
the reference checkpoint (its path and the files of the step that is loaded). A later run with the
same inputs finds it and skips the pass; change any of them and it is computed afresh. Files are
written beside and renamed into place, so a crash never leaves a half-written table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from align_jax import checkpoint

log = logging.getLogger(__name__)

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "align_jax", "ref_logps")


def _file_digest(path: str, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def data_fingerprint(paths: Iterable[str] | str) -> str:
    """Content hash of local data files (glob-expanded, in order); a non-file spec (a hub dataset name)
    is hashed as its name."""
    import glob

    specs = [paths] if isinstance(paths, str) else list(paths)
    h = hashlib.sha256()
    for spec in specs:
        files = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        for f in files:
            h.update(f.encode())
            if os.path.isfile(f):
                _file_digest(f, h)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    blob = json.dumps(
        {"vocab": vocab, "special": special, "template": getattr(tokenizer, "chat_template", None) or ""},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_fingerprint(init_from: str, seed: int, model_json: Mapping[str, Any]) -> str:
    """Identifies the reference weights without loading them: an HF directory's weight files (names,
    sizes, modification times), or a workdir's latest checkpoint step and its files; a fresh init by
    its seed and model config."""
    h = hashlib.sha256(json.dumps(dict(model_json), sort_keys=True, default=str).encode())
    if not init_from:
        h.update(f"scratch:{seed}".encode())
        return h.hexdigest()
    root = os.path.abspath(init_from)
    if checkpoint.is_hf_dir(root):
        base = root
        names = sorted(n for n in os.listdir(root) if n.endswith((".safetensors", ".json")))
    else:
        directory = checkpoint.checkpoint_dir(root)
        step = checkpoint.latest_step_on_disk(root)
        if step is None:
            raise FileNotFoundError(f"init_from={init_from}: no checkpoint under {directory}")
        base = os.path.join(directory, str(step))
        names = sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)
    h.update(base.encode())
    for n in names:
        st = os.stat(os.path.join(base, n))
        h.update(f"{n}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(cache_dir: str, key: str, split: str) -> str:
    return os.path.join(cache_dir or DEFAULT_CACHE_DIR, f"{split}-{key}.npy")


def load_table(path: str) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    table = np.load(path)
    if table.ndim != 2 or table.shape[1] != 2:
        raise ValueError(f"{path}: a reference log-prob table is [rows, 2], got {table.shape}; delete it")
    return table


def save_table(path: str, table: np.ndarray) -> None:
    """Atomic: written under a temporary name in the same directory, then renamed."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)


def _gather(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def slots(batch: Mapping[str, np.ndarray], units_per_row: int) -> np.ndarray:
    """[b, P] table rows of a batch's pairs (-1: none). A paired dataset read as unpaired (KTO) gives two
    units per source row, told apart by their label."""
    ids = np.asarray(batch["example_id"])
    if units_per_row == 1:
        return ids
    return np.where(ids >= 0, ids * 2 + np.asarray(batch["kto_label"]), -1)


def compute_table(
    batches: Iterable[Mapping[str, np.ndarray]],
    num_rows: int,
    logps_fn: Callable[[dict[str, jax.Array]], jax.Array],
    to_global: Callable[[Mapping[str, np.ndarray]], dict[str, jax.Array]],
    units_per_row: int = 1,
) -> np.ndarray:
    """One pass over `batches` (this host's slices of global batches that hold every pair once):
    `logps_fn(global batch) -> [B, 2P]` per-segment log-prob sums, scattered into a
    [num_rows * units_per_row, 2] table by `slots`. Rows never seen stay NaN."""
    table = np.full((num_rows * units_per_row, 2), np.nan, np.float32)
    t0, n = time.perf_counter(), 0
    for host in batches:
        batch = to_global(host)
        logps = _gather(logps_fn(batch))  # [B, 2P]
        ids = slots({k: _gather(batch[k]) for k in ("example_id", "kto_label")}, units_per_row)  # [B, P]
        chosen, rejected = logps[:, 0::2], logps[:, 1::2]
        present = ids >= 0
        table[ids[present], 0] = chosen[present]
        table[ids[present], 1] = rejected[present]
        n += int(present.sum())
    log.info("reference log-probs of %d pairs in %.1fs", n, time.perf_counter() - t0)
    return table


def attach(
    host_batch: Mapping[str, np.ndarray], table: np.ndarray, where: str = "", units_per_row: int = 1
) -> dict[str, np.ndarray]:
    """The batch plus `ref_logps` [b, 2P] looked up by `slots` (0 for absent pairs)."""
    ids = slots(host_batch, units_per_row)
    present = ids >= 0
    rows = table[np.where(present, ids, 0)]  # [b, P, 2]
    rows = np.where(present[..., None], rows, 0.0)
    if np.isnan(rows).any():
        missing = sorted(set(ids[present & np.isnan(rows).any(-1)].tolist()))[:5]
        raise ValueError(f"{where}: no cached reference log-probs for rows {missing}; delete the cache and rerun")
    b, p = ids.shape
    return {**host_batch, "ref_logps": rows.reshape(b, 2 * p).astype(np.float32)}


class WithReference:
    """A data iterator whose batches carry `ref_logps` from a cached table. Passes state(), restore() and
    stats() through, so resuming works exactly as without it. Iterating an eval loader again starts over."""

    def __init__(self, inner: Any, table: np.ndarray, where: str, units_per_row: int = 1):
        self.inner, self.table, self.where, self.units = inner, table, where, units_per_row

    def __iter__(self):
        if hasattr(self.inner, "__next__"):
            return self
        return (attach(b, self.table, self.where, self.units) for b in self.inner)

    def __next__(self) -> dict[str, np.ndarray]:
        return attach(next(self.inner), self.table, self.where, self.units)

    def __len__(self) -> int:
        return len(self.inner)

    def state(self) -> dict:
        return self.inner.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.inner.restore(state)

    def stats(self) -> dict:
        return self.inner.stats()
