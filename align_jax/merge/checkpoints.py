"""Merging whole models on disk into a new align_jax workdir, tensor by tensor.

The output is what a stage leaves behind, so `config.init_from`, `launch/export.py`, `ChatModel.load` and
the pipeline read it like any stage's workdir:

  OUT/checkpoints/0/   Orbax step 0: state = {'params': merged}, data = {}, config = {"config": {"stage":
                       "merge", "merge": recipe}, "hf_model_config": ..., "runtime": ...}
  OUT/tokenizer/       the first model's tokenizer that exists (else the base's)
  OUT/summary.json     the summary; its presence means "finished", and its recipe decides whether a
                       second call with the same arguments can skip the work

The whole directory is built beside OUT and renamed into place, so OUT is never half-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from align_jax import checkpoint, outdir
from align_jax.merge.methods import (
    check_models,
    is_stacked,
    merge_tensors,
    normalized,
    resolve_kwargs,
    resolve_weights,
)
from align_jax.merge.sources import Source, check_same_architecture, open_source
from align_jax.models import hf
from align_jax.models.config import RUNTIME_FIELDS
from align_jax.models.hf_config import to_hf_dict

log = logging.getLogger(__name__)

STAGE = "merge"
STEP = 0


def recipe_of(
    method: str, sources: Sequence[str], base: str | None, weights: Sequence[float] | None, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Everything that decides a merge's result, with defaults filled in and paths made absolute, as the
    JSON it is stored as (so a stored recipe and a new one compare equal when they mean the same)."""
    check_models(method, len(sources), base is not None)
    recipe = {
        "method": method,
        "sources": [os.path.abspath(os.fspath(s)) for s in sources],
        "base": None if base is None else os.path.abspath(os.fspath(base)),
        "weights": resolve_weights(method, weights, len(sources)),
        **resolve_kwargs(method, kwargs),
    }
    if method == "linear" and recipe["normalize"]:
        normalized(recipe["weights"])  # weights summing to 0 fail here, before any source is read
    return json.loads(json.dumps(recipe))


def _finished(out: str, recipe: dict, overwrite: bool) -> dict | None:
    """The stored summary when OUT already holds this merge; None when OUT is free to (over)write."""
    from align_jax.workdir import read_summary

    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"merge output {out} exists and is not a directory")
    if not os.path.isdir(out) or not os.listdir(out):
        return None
    if overwrite:  # replaces an earlier merge, never a training workdir or a folder of runs
        outdir.check_replaceable(out, kind="merged workdir", is_ours=is_merge, overwrite=True)
        return None
    summary = read_summary(out)
    if summary is not None and summary.get("recipe") == recipe and os.path.isdir(checkpoint.checkpoint_dir(out)):
        return summary
    if summary is not None and "recipe" in summary:
        old = summary["recipe"]
        diff = {k: (old.get(k), recipe.get(k)) for k in sorted(set(old) | set(recipe)) if old.get(k) != recipe.get(k)}
        raise FileExistsError(
            f"{out} holds a merge with a different recipe (field: (stored, requested)): {diff}; "
            "pass overwrite=True (--overwrite) to replace it, or choose another output"
        )
    raise FileExistsError(
        f"{out} exists, is not empty and holds no finished merge; pass overwrite=True (--overwrite) to replace it"
    )


def is_merge(path: str) -> bool:
    """Whether `path` is a workdir this module wrote: its summary says stage "merge", and it holds only
    what a merge writes (a training workdir also has metrics.jsonl, a folder of runs has other entries)."""
    from align_jax.workdir import read_summary

    try:
        summary = read_summary(path)
    except (OSError, ValueError):
        return False
    # checkpoints/, tokenizer/, summary.json, and the record the pipeline keeps beside a merge.
    expected = {checkpoint.CHECKPOINT_DIR, "tokenizer", "summary.json", "pipeline_stage.json"}
    return bool(summary) and summary.get("stage") == STAGE and set(os.listdir(path)) <= expected


def _collect_stats(per_leaf: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """{stat: {"mean": over every slice, "by_tensor": {leaf: mean over its layers}, "per_layer": {stacked
    leaf: [one value per layer]}}}, e.g. Model Stock's ratio t per tensor group."""
    out: dict[str, Any] = {}
    for name, stats in per_leaf.items():
        for stat, values in stats.items():
            entry = out.setdefault(stat, {"mean": 0.0, "by_tensor": {}, "per_layer": {}, "_all": []})
            entry["by_tensor"][name] = float(np.mean(values))
            entry["_all"].extend(values)
            if is_stacked(name):
                entry["per_layer"][name] = [float(v) for v in values]
    for entry in out.values():
        entry["mean"] = float(np.mean(entry.pop("_all")))
    return out


def _save_tokenizer(sources: Sequence[Source], dest: str) -> str | None:
    """Copies the first source's tokenizer that exists into `dest`; returns that source's path."""
    for src in sources:
        tok_dir = src.tokenizer_dir()
        if tok_dir is None:
            continue
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(dest)
        return src.path
    log.warning("no source has a tokenizer; the merged workdir has none")
    return None


def _open_all(recipe: dict[str, Any], stack: contextlib.ExitStack) -> tuple[list[Source], Source | None]:
    """Opens every source and the base, each registered on `stack` as soon as it is open, so an error
    opening a later one still closes the earlier ones."""
    models: list[Source] = []
    for path in recipe["sources"]:
        models.append(open_source(path))
        stack.callback(models[-1].close)
    base_src = None
    if recipe["base"] is not None:
        base_src = open_source(recipe["base"])
        stack.callback(base_src.close)
    return models, base_src


def _merge_leaves(
    method: str,
    recipe: dict[str, Any],
    kw: dict[str, Any],
    models: Sequence[Source],
    base_src: Source | None,
    anchor: Source,
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, dict[str, list[float]]]]:
    """The merged params, flat, and each leaf's method statistics (if it reports any). Reads one leaf of
    each source at a time, so memory holds the merged model plus one leaf per source, never whole sources;
    the leaves are those of the anchor's architecture, which every source was checked to share."""
    abstract = traverse_util.flatten_dict(nn.meta.unbox(hf.abstract_params(anchor.cfg)))
    merged: dict[tuple[str, ...], np.ndarray] = {}
    per_leaf_stats: dict[str, dict[str, list[float]]] = {}
    for leaf in sorted(abstract):
        shape, name = tuple(abstract[leaf].shape), "/".join(leaf)
        tensors = [src.read(leaf, shape) for src in models]
        base_t = None if base_src is None else base_src.read(leaf, shape)
        stats: dict[str, list[float]] = {}
        merged[leaf] = merge_tensors(
            method,
            tensors,
            base_t,
            weights=recipe["weights"],
            name=name,
            layer_axis=is_stacked(name),
            stats=stats,
            **kw,
        )
        del tensors, base_t  # one leaf per source at a time
        if stats:
            per_leaf_stats[name] = stats
        log.debug("merged %s %s", name, shape)
    return merged, per_leaf_stats


def _saved_config(recipe: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The config stored with the checkpoint, in the layout a training stage stores, so everything that
    loads a stage's workdir (init_from, export, ChatModel.load) loads the merge the same way."""
    return {
        "config": {"stage": STAGE, STAGE: recipe},
        "hf_model_config": to_hf_dict(cfg),
        "runtime": {k: getattr(cfg, k) for k in RUNTIME_FIELDS},
    }


def _summary(
    method: str,
    recipe: dict[str, Any],
    kw: dict[str, Any],
    out: str,
    merged: dict[tuple[str, ...], np.ndarray],
    dtype: np.dtype,
    opened: Sequence[Source],
    per_leaf_stats: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    """The summary, all but the tokenizer and the seconds (known only once the workdir is written). It is
    built before the checkpoint is saved, because `merged` is dropped right after saving."""
    summary = {
        "stage": STAGE,
        "method": method,
        "sources": recipe["sources"],
        "base": recipe["base"],
        "weights": recipe["weights"],
        "kwargs": kw,
        "recipe": recipe,
        "out": out,
        "n_tensors": len(merged),
        "n_params": int(sum(math.prod(x.shape) for x in merged.values())),
        "dtype": np.dtype(dtype).name,
        "source_steps": {s.path: s.step for s in opened},
    }
    if per_leaf_stats:
        summary["stats"] = _collect_stats(per_leaf_stats)
    return summary


def _save_checkpoint(tmp: str, merged: dict[tuple[str, ...], np.ndarray], saved_config: dict[str, Any]) -> None:
    """Saves the merged params as step STEP of an Orbax checkpoint in `tmp`, synchronously: the directory
    is renamed into place right after, so the save must be complete on return."""
    ckpt = checkpoint.Checkpointer(tmp, keep=1, async_save=False)
    try:
        ckpt.save(STEP, {"params": traverse_util.unflatten_dict(merged)}, {}, saved_config)
    finally:
        ckpt.close()


def merge_checkpoints(
    method: str,
    sources: Sequence[str],
    out: str,
    *,
    base: str | None = None,
    weights: Sequence[float] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict:
    """Merges `sources` (stage workdirs or HF directories; `base` is the model they were fine-tuned from,
    for the methods that need it) into a new workdir `out`, reading one leaf of each source at a time.

    Params keep the anchor's dtype (the base's, else the first source's); the arithmetic is float32.
    If `out` already holds a finished merge with the same recipe, returns its summary (with skipped=True)
    without recomputing; a different recipe there is an error unless `overwrite`."""
    from align_jax.workdir import TOKENIZER_DIR, write_summary

    start = time.perf_counter()
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if jax.process_count() > 1:
        raise ValueError("merge_checkpoints runs on one host; launch it as a single process")
    recipe = recipe_of(method, sources, base, weights, kwargs)
    out = os.path.abspath(os.fspath(out))
    inputs = [("source", p) for p in recipe["sources"]] + ([("base", recipe["base"])] if recipe["base"] else [])
    outdir.check_apart(out, inputs, kind="merge", suffix="-merged")
    done = _finished(out, recipe, overwrite)
    if done is not None:
        log.info("%s already holds this merge; skipping", out)
        return {**done, "skipped": True}
    kw = {k: v for k, v in recipe.items() if k not in ("method", "sources", "base", "weights")}

    with contextlib.ExitStack() as stack:
        models, base_src = _open_all(recipe, stack)
        opened = [*models, *([base_src] if base_src else [])]
        anchor = base_src if base_src is not None else models[0]
        check_same_architecture(anchor, [s for s in models if s is not anchor])
        merged, per_leaf_stats = _merge_leaves(method, recipe, kw, models, base_src, anchor)
        dtype = merged[("embed", "embedding")].dtype
        saved_config = _saved_config(recipe, anchor.cfg.replace(param_dtype=np.dtype(dtype).name))
        summary = _summary(method, recipe, kw, out, merged, dtype, opened, per_leaf_stats)

        # Built beside OUT and renamed into place, so OUT is never half-written.
        with outdir.staged(out) as tmp:
            _save_checkpoint(tmp, merged, saved_config)
            del merged  # the tokenizer and summary need no params
            summary["tokenizer"] = _save_tokenizer(opened, os.path.join(tmp, TOKENIZER_DIR))
            summary["seconds"] = round(time.perf_counter() - start, 3)
            write_summary(tmp, summary)
    return summary
