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
import json
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import SingleDeviceSharding

from align_jax import outdir
from align_jax.models import safetensors_io
from align_jax.models.config import ModelConfig, read_hf_config, to_hf_dict
from align_jax.models.transformer import boxed_init
from align_jax.sharding import Sharder, tree_shardings

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or shares; never an error.
IGNORED_TENSORS = ("model.rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
    """An HF checkpoint whose tensors do not match its config."""


# (our path below `layers/stack`) -> (HF name below `model.layers.{i}`, layout), where layout is
#   None: the same array;  0: HF holds it flattened to 1-D (norm scales, biases [N, H] -> [N*H]);
#   k>0: our kernel [in (k dims)..., out...] is HF's weight [out, in] transposed and flattened.
_LAYER_MAP = {
    ("input_norm", "scale"): ("input_layernorm.weight", 0),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", 0),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", 1),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", 1),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", 1),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", 2),
    ("attn", "q_proj", "bias"): ("self_attn.q_proj.bias", 0),
    ("attn", "k_proj", "bias"): ("self_attn.k_proj.bias", 0),
    ("attn", "v_proj", "bias"): ("self_attn.v_proj.bias", 0),
    ("attn", "o_proj", "bias"): ("self_attn.o_proj.bias", 0),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", 1),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", 1),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", 1),
    ("mlp", "gate_proj", "bias"): ("mlp.gate_proj.bias", 0),
    ("mlp", "up_proj", "bias"): ("mlp.up_proj.bias", 0),
    ("mlp", "down_proj", "bias"): ("mlp.down_proj.bias", 0),
}
_TOP_MAP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", None),
    ("final_norm", "scale"): ("model.norm.weight", 0),
    ("lm_head", "kernel"): ("lm_head.weight", 1),
}


def _hf_names(path: tuple[str, ...], num_layers: int) -> tuple[list[str], int | None]:
    """HF tensor names for one of our leaves (L names for a stacked leaf) and its layout kind."""
    if path[:2] == ("layers", "stack"):
        name, n_in = _LAYER_MAP[path[2:]]
        return [f"model.layers.{i}.{name}" for i in range(num_layers)], n_in
    name, n_in = _TOP_MAP[path]
    return [name], n_in


def _hf_shape(shape: tuple[int, ...], n_in: int | None) -> tuple[int, ...]:
    if n_in is None:
        return shape
    if n_in == 0:
        return (math.prod(shape),)
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def to_ours(hf: np.ndarray, shape: tuple[int, ...], n_in: int | None) -> np.ndarray:
    return hf.T.reshape(shape) if n_in else hf.reshape(shape)


def to_hf(ours: np.ndarray, n_in: int | None) -> np.ndarray:
    if n_in is None:
        return ours
    if n_in == 0:
        return ours.reshape(-1)
    return ours.reshape(math.prod(ours.shape[:n_in]), -1).T


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


def _leaf_specs(cfg: ModelConfig, abstract: Any) -> Iterator[tuple[tuple[str, ...], Any, list[str], int | None]]:
    flat = traverse_util.flatten_dict(abstract)
    for path, box in sorted(flat.items()):
        names, n_in = _hf_names(path, cfg.num_layers)
        yield path, box, names, n_in


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
    abstract = abstract_params(cfg, sharder)

    expected: set[str] = set()
    for path, box, names, n_in in _leaf_specs(cfg, abstract):
        want = _hf_shape(box.value.shape[1:] if path[0] == "layers" else box.value.shape, n_in)
        for name in names:
            expected.add(name)
            if name not in index.where:
                continue
            got = index.shape(name)
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
    for path, box, names, n_in in _leaf_specs(cfg, abstract):
        shape = box.value.shape
        stacked = path[0] == "layers"
        sharding = (
            traverse_util.flatten_dict(shardings)[path]
            if shardings is not None
            else SingleDeviceSharding(jax.devices()[0])
        )

        def read(idx, names=names, n_in=n_in, shape=shape, stacked=stacked):
            if not stacked:
                return to_ours(index[names[0]], shape, n_in)[idx].astype(target)
            layer_idx, rest = idx[0], idx[1:]
            layers = range(*layer_idx.indices(shape[0]))
            return np.stack([to_ours(index[names[i]], shape[1:], n_in)[rest].astype(target) for i in layers])

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
    entries: list[tuple[str, tuple[str, ...], int | None, int | None]] = []  # (hf name, path, layer, n_in)
    for path in sorted(flat):
        names, n_in = _hf_names(path, cfg.num_layers)
        for i, name in enumerate(names):
            entries.append((name, path, i if path[0] == "layers" else None, n_in))

    def nbytes(entry) -> int:
        _, path, layer, _ = entry
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        return math.prod(shape) * target.itemsize

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
    tmp = outdir.make_scratch(out_dir)
    try:
        weight_map, total = {}, 0
        cache: dict[tuple[str, ...], np.ndarray] = {}
        for n, shard in enumerate(shards):
            fname = SINGLE_FILE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"

            def tensors(shard=shard):
                for name, path, layer, n_in in shard:
                    if path not in cache:
                        cache.clear()  # keep one gathered leaf on the host at a time
                        cache[path] = _host(flat[path])
                    value = cache[path] if layer is None else cache[path][layer]
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
        check_export_target(out_dir, overwrite)  # again: the gathers took a while, the target may have changed
        outdir.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
