"""Hugging Face directories <-> align_jax params.

Loading reads `config.json` and the safetensors (one file, or shards listed in
`model.safetensors.index.json`), and builds every parameter straight into its sharding with
`jax.make_array_from_callback`: each device's callback reads only the slice it holds from a memory
map, so no host ever materialises the whole model. Saving writes to a temporary directory and renames
it into place, so a crash never leaves a half-written export; it replaces only a previous export, and
only when asked, never a directory that holds anything else.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import SingleDeviceSharding

from align_jax import outdir
from align_jax.models import safetensors_io
from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import read_hf_config, to_hf_dict
from align_jax.models.hf_names import LeafNames, TensorRef, hf_shape, leaf_names, ref_name, to_hf, to_ours
from align_jax.models.transformer import boxed_init
from align_jax.sharding import Sharder, tree_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or shares; never an error.
IGNORED_TENSORS = ("model.rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
    """An HF checkpoint whose tensors do not match its config."""


def abstract_params(cfg: ModelConfig, sharder: Sharder = Sharder()) -> Any:
    """The boxed (logical names + ShapeDtypeStruct) param tree of `cfg`, without allocating it."""
    return jax.eval_shape(functools.partial(boxed_init, cfg, sharder=sharder), jax.random.key(0))


class _TensorIndex:
    """Where each HF tensor lives, across a single file or an index of shards."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index_path}: no 'weight_map' object")
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            weight_map = None
        else:
            found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "no such directory"
            raise CheckpointFormatError(
                f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); only safetensors checkpoints are read"
            )
        self._files: dict[str, safetensors_io.SafetensorsFile] = {}
        if weight_map is None:
            f = self._file(SINGLE_FILE)
            self.where = {name: SINGLE_FILE for name in f.names()}
        else:
            self.where = dict(weight_map)
            for fname in sorted(set(self.where.values())):
                f = self._file(fname)
                missing = [n for n, w in self.where.items() if w == fname and n not in f.names()]
                if missing:
                    raise CheckpointFormatError(f"{f.path}: index lists tensors the file lacks: {missing[:5]}")

    def _file(self, fname: str) -> safetensors_io.SafetensorsFile:
        if fname not in self._files:
            path = os.path.join(self.hf_dir, fname)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"{self.hf_dir}: {INDEX_FILE} names {fname}, which does not exist")
            self._files[fname] = safetensors_io.SafetensorsFile(path)
        return self._files[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.where[name]).shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._file(self.where[name])[name]

    def path(self, name: str) -> str:
        return os.path.join(self.hf_dir, self.where[name])


def _leaf_specs(cfg: ModelConfig, abstract: Any) -> Iterator[tuple[tuple[str, ...], Any, LeafNames]]:
    flat = traverse_util.flatten_dict(abstract)
    for path, box in sorted(flat.items()):
        yield path, box, leaf_names(cfg, path)


def _refs(leaf: LeafNames, index: _TensorIndex) -> tuple[TensorRef, ...]:
    """The leaf's per-slice tensors in the form this checkpoint holds them."""
    held = all(n in index.where for n in leaf.names)
    if leaf.fused and not held and all(ref_name(r) in index.where for r in leaf.fused):
        return leaf.fused
    return leaf.names


def _ref_shape(ref: TensorRef, index: _TensorIndex) -> tuple[int, ...]:
    if isinstance(ref, str):
        return index.shape(ref)
    name, _, start, end = ref
    full = index.shape(name)
    return (end - start, *full[2:]) if end <= full[1] else full


def _read_ref(ref: TensorRef, index: _TensorIndex) -> np.ndarray:
    if isinstance(ref, str):
        return index[ref]
    name, expert, start, end = ref
    return index[name][expert, start:end]


def _read_slice(index: _TensorIndex, leaf: LeafNames, shape: tuple[int, ...], idx: tuple, target) -> np.ndarray:
    """Our leaf's slice `idx` (a tuple of slices, one per dim), read from only the tensors it covers."""
    refs = _refs(leaf, index)
    lead, rest = shape[: leaf.stack], idx[leaf.stack :]
    ranges = [range(*idx[d].indices(lead[d])) for d in range(leaf.stack)]
    parts = [
        to_ours(
            _read_ref(refs[int(np.ravel_multi_index(at, lead)) if lead else 0], index), shape[leaf.stack :], leaf.n_in
        )[rest]
        for at in itertools.product(*ranges)
    ]
    out = np.stack(parts) if leaf.stack else np.array(parts[0])
    out = out.reshape(*(len(r) for r in ranges), *parts[0].shape)
    return out if target is None else out.astype(target, copy=False)


def read_leaf(cfg: ModelConfig, hf_dir: str, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    """One whole leaf of ours from an HF directory (tensor by tensor: the merge reads leaves one at a time),
    in the dtype the checkpoint stores, its tensors' shapes checked against what `cfg` implies."""
    index = _TensorIndex(hf_dir)
    leaf = leaf_names(cfg, path)
    want = hf_shape(shape[leaf.stack :], leaf.n_in)
    for ref in _refs(leaf, index):
        name = ref_name(ref)
        if name not in index.where:
            raise CheckpointFormatError(f"{hf_dir}: no tensor {name!r} (for our {'/'.join(path)})")
        got = _ref_shape(ref, index)
        if got != want:
            raise CheckpointFormatError(
                f"{index.path(name)}: tensor {name!r} has shape {list(got)}, config.json implies {list(want)}"
            )
    every = tuple(slice(None) for _ in shape)
    return _read_slice(index, leaf, shape, every, None)


def load_pretrained(
    hf_dir: str | os.PathLike,
    dtype: str = "float32",
    *,
    compute_dtype: str | None = None,
    sharder: Sharder = Sharder(),
    **runtime: Any,
) -> tuple[ModelConfig, Any]:
    """Reads an HF directory into (ModelConfig, params). `dtype` is the param dtype; compute runs in
    `compute_dtype` (default: the same). `runtime` sets other ModelConfig runtime fields (remat, ...).
    With a mesh in `sharder`, every tensor is placed straight into its sharding."""
    hf_dir = os.fspath(hf_dir)
    cfg = read_hf_config(hf_dir, param_dtype=dtype, dtype=compute_dtype or dtype, **runtime)
    index = _TensorIndex(hf_dir)
    abstract = abstract_params(cfg.replace(lora_rank=0), sharder)

    expected: set[str] = set()
    for _, box, leaf in _leaf_specs(cfg, abstract):
        want = hf_shape(box.value.shape[leaf.stack :], leaf.n_in)
        for ref in _refs(leaf, index):
            name = ref_name(ref)
            expected.add(name)
            if name not in index.where:
                continue
            got = _ref_shape(ref, index)
            if got != want:
                raise CheckpointFormatError(
                    f"{index.path(name)}: tensor {name!r} has shape {list(got)}, but config.json implies {list(want)}"
                )
    missing = sorted(expected - set(index.where))
    if missing:
        raise CheckpointFormatError(f"{hf_dir}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    benign = set(IGNORED_TENSORS) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = sorted(set(index.where) - expected - benign)
    if unexpected:
        raise CheckpointFormatError(
            f"{hf_dir}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"(not used by a {cfg.model_type} model with this config.json)"
        )

    shardings = tree_shardings(abstract, sharder) if sharder.mesh is not None else None
    target = np.dtype(cfg.jnp_param_dtype)
    flat = {}
    for path, box, leaf in _leaf_specs(cfg, abstract):
        shape = box.value.shape
        sharding = (
            traverse_util.flatten_dict(shardings)[path]
            if shardings is not None
            else SingleDeviceSharding(jax.devices()[0])
        )

        def read(idx, leaf=leaf, shape=shape):
            return _read_slice(index, leaf, shape, idx, target)

        flat[path] = jax.make_array_from_callback(shape, sharding, read)
    return cfg, traverse_util.unflatten_dict(flat)


def _host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_pretrained(
    cfg: ModelConfig,
    params: Any,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> str:
    """Writes an HF directory (config.json, safetensors, generation_config.json, tokenizer files).

    Tensors are gathered and converted one at a time; shards above `max_shard_bytes` are split with an
    index. The directory appears all at once (written beside it, then renamed). `out_dir` must be new
    or empty, or a previous export and `overwrite=True` (see `check_export_target`)."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_on_process_0(out_dir, overwrite)
    target = np.dtype(dtype or cfg.param_dtype)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    # (hf name, path, index of the slice along the leaf's stacked dims, layout)
    entries: list[tuple[str, tuple[str, ...], tuple[int, ...], int | None]] = []
    for path in sorted(flat):
        leaf = leaf_names(cfg, path)
        lead = flat[path].shape[: leaf.stack]
        for k, name in enumerate(leaf.names):
            at = tuple(int(i) for i in np.unravel_index(k, lead)) if lead else ()
            entries.append((ref_name(name), path, at, leaf.n_in))

    def nbytes(entry) -> int:
        _, path, at, _ = entry
        return math.prod(flat[path].shape[len(at) :]) * target.itemsize

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + nbytes(entry) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)

    if jax.process_index() != 0:
        for path in flat:  # every process joins the gathers; only process 0 writes.
            _host(flat[path])
        return out_dir
    # `check` runs again before the rename: the gathers took a while, the target may have changed.
    with outdir.staged(out_dir, check=lambda: check_export_target(out_dir, overwrite)) as tmp:
        weight_map, total = {}, 0
        cache: dict[tuple[str, ...], np.ndarray] = {}
        for n, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"

            def tensors(shard=shard):
                for name, path, layer, n_in in shard:
                    if path not in cache:
                        cache.clear()  # keep one gathered leaf on the host at a time
                        cache[path] = _host(flat[path])
                    value = cache[path][layer]
                    yield name, to_hf(value, n_in).astype(target)

            total += safetensors_io.write(os.path.join(tmp, fname), tensors())
            weight_map.update({name: fname for name, *_ in shard})
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(target.name)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(to_hf_dict(cfg, torch_dtype=torch_dtype), f, indent=2)
        gen = {
            k: v
            for k, v in (
                ("bos_token_id", cfg.bos_token_id),
                ("eos_token_id", cfg.eos_token_id),
                ("pad_token_id", cfg.pad_token_id),
            )
            if v is not None
        }
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in gen.items()}, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def check_export_target(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises FileExistsError unless `out_dir` is absent, an empty directory, or (with `overwrite`) a
    previous HF export: config.json and safetensors weights, regular files only. A stage workdir or a
    folder of runs is never one, so a mistyped target cannot wipe checkpoints or sibling runs."""
    outdir.check_replaceable(out_dir, kind="Hugging Face export", is_ours=is_export, overwrite=overwrite)


def is_export(path: str) -> bool:
    """Whether `path` holds an HF model directory and nothing else (HF model directories are flat)."""
    with os.scandir(path) as it:
        entries = list(it)
    names = {e.name for e in entries}
    if not all(e.is_file(follow_symlinks=False) for e in entries) or "config.json" not in names:
        return False
    if SINGLE_FILE in names:
        return True
    try:
        with open(os.path.join(path, INDEX_FILE)) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and shards <= names


def _check_on_process_0(out_dir: str, overwrite: bool) -> None:
    """Process 0 writes, so it judges the target; every process must stop with it, or the others would
    wait forever in the gathers that follow."""
    refused = None
    if jax.process_index() == 0:
        try:
            check_export_target(out_dir, overwrite)
        except FileExistsError as e:
            refused = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
            refused = FileExistsError(f"{out_dir}: process 0 refused this export target (its error says why)")
    if refused is not None:
        raise refused
