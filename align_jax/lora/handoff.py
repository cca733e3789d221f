"""A LoRA workdir read as plain params: its base with the adapters merged in.

A LoRA run's checkpoints hold its trainable tree only (adapters, plus the RM's head or PPO's value model).
Everything that reads a workdir's params (the next stage's init_from, export, chat, reward scoring, merge)
goes through `checkpoint.restore_params`, which is `restore_params` here: for a LoRA workdir the base is read from the run's
own init_from (an HF directory, a workdir, itself a LoRA workdir: this recurses, or the seeded fresh init),
passed through NF4 and back when the run was QLoRA (the base its adapters were trained on), and every
adapted kernel becomes W + (alpha / r) A B.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from align_jax import checkpoint_reader as reader
from align_jax.config.sections import lora_targets
from align_jax.lora import tree
from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import from_hf_dict
from align_jax.models.transformer import boxed_init
from align_jax.sharding import Sharder


def restore_params(
    workdir: str, abstract_params: Any, step: int | None = None, key: str = "params", *, sharder: Sharder | None = None
) -> Any:
    """`checkpoint.restore_params`: the stored params, or for a LoRA workdir its merged ones."""
    saved = reader.read_config(workdir, step, what="init_from")
    if saved.get("lora") and key == "params":
        return restore_merged(workdir, saved, abstract_params, step, sharder)
    return reader.restore_raw_params(workdir, abstract_params, step, key)


def fresh_base(cfg: ModelConfig, sharder: Sharder, seed: int, like: Any, shardings: Any = None) -> Any:
    """The seeded fresh init of the base decoder (what a LoRA run without init_from starts from), at the
    paths of `like` (an RM's decoder has no LM head); only those leaves are computed."""
    base_cfg = cfg.replace(lora_rank=0)
    init = jax.jit(
        lambda rng: tree.select(nn.meta.unbox(boxed_init(base_cfg, rng, sharder=sharder)), like),
        out_shardings=shardings,
    )
    return init(jax.random.key(seed))


def lora_part(saved: dict) -> str | None:
    """Where the adapted decoder sits in the run's params: None (the top: SFT, DPO, GRPO), "decoder" (RM),
    "policy" (PPO)."""
    config = saved.get("config", {})
    if config.get("stage") == "rm":
        return "decoder"
    if config.get("stage") == "grpo" and config.get("algorithm") == "ppo":
        return "policy"
    return None


def saved_model_config(saved: dict, where: str) -> ModelConfig:
    """The run's base model config (lora off), param dtype and all."""
    return from_hf_dict(saved["hf_model_config"], where=f"{where} (saved config)", **saved.get("runtime", {}))


def _sharding(leaf: Any) -> Any:
    return getattr(leaf, "sharding", None)


def _part_of(params: Any, part: str | None) -> dict:
    return params if part is None else params.get(part, {})


def abstract_trainable(saved: dict, abstract_params: Any, part: str | None) -> dict:
    """What to read from the checkpoint for `abstract_params`: the adapters of every kernel of the part
    (replicated: they are small) and the requested leaves outside it."""
    lora = saved["config"]["lora"]
    flat = tree.flatten(abstract_params)
    base_like = _part_of(abstract_params, part)
    dtype = saved.get("runtime", {}).get("param_dtype", "float32")
    adapters = tree.adapters_like(base_like, int(lora["rank"]), lora_targets(lora["targets"]), dtype)
    mesh = next((s.mesh for s in map(_sharding, flat.values()) if isinstance(s, NamedSharding)), None)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), adapters)
    rest = {p: v for p, v in flat.items() if part is not None and p[0] != part}
    return tree.merge(tree.unflatten(rest), adapters, part)


def restore_merged(
    workdir: str, saved: dict, abstract_params: Any, step: int | None = None, sharder: Sharder | None = None
) -> Any:
    """The params of LoRA workdir `workdir` at the paths of `abstract_params` (in their shardings, where
    they carry any), adapters merged into the base."""
    config, lora = saved["config"], saved["config"]["lora"]
    cfg = saved_model_config(saved, workdir)
    part = lora_part(saved)
    trainable = reader.restore_raw_params(workdir, abstract_trainable(saved, abstract_params, part), step)
    base_like = _part_of(abstract_params, part)
    placed = all(isinstance(_sharding(x), jax.sharding.Sharding) for x in jax.tree.leaves(base_like))
    shardings = jax.tree.map(_sharding, base_like) if placed else None
    init_from = config.get("init_from") or ""
    if not init_from:
        base = fresh_base(cfg, sharder or Sharder(), int(config.get("seed", 0)), base_like, shardings)
    elif reader.is_hf_dir(init_from):
        from align_jax.models.hf import load_pretrained

        _, base = load_pretrained(
            init_from, dtype=cfg.param_dtype, compute_dtype=cfg.dtype, sharder=sharder or Sharder()
        )
        base = tree.select(base, base_like)
    else:
        base = restore_params(init_from, base_like, sharder=sharder)
    if lora.get("quantize", "none") != "none":  # the base the adapters saw: through NF4 and back
        base = tree.frozen_base(
            base,
            quantize=lora["quantize"],
            block_size=int(lora["block_size"]),
            param_dtype="float32",
            compute_dtype="float32",
        )
    scale = float(lora["alpha"]) / int(lora["rank"])
    adapters = trainable if part is None else trainable[part]
    dtypes = jax.tree.map(lambda x: x.dtype, base_like)  # the caller's (a scorer may read in another dtype)

    def merge(a: Any, b: Any) -> Any:
        merged = tree.merged_weights(a, b, scale=scale, dtype=cfg.param_dtype)
        return jax.tree.map(lambda x, d: x.astype(d), merged, dtypes)

    merge = jax.jit(merge, out_shardings=shardings)
    merged = merge(tree.adapters_of(adapters), base)
    rest = {p: v for p, v in tree.flatten(trainable).items() if part is not None and p[0] != part}
    return tree.merge(tree.unflatten(rest), merged, part)


def raw_adapters(workdir: str, step: int | None = None) -> tuple[dict, ModelConfig, dict]:
    """(adapters of the decoder, base model config, saved config) of a LoRA workdir, unmerged (for a PEFT
    export)."""
    from align_jax.models.hf import abstract_params

    saved = reader.read_config(workdir, step)
    if not saved.get("lora"):
        raise ValueError(f"{workdir} is not a LoRA run (its config.lora.rank is 0): it has no adapters to write")
    cfg = saved_model_config(saved, workdir)
    part = lora_part(saved)
    abstract = nn.meta.unbox(abstract_params(cfg.replace(lora_rank=0)))
    like = abstract if part is None else {part: abstract}
    trainable = reader.restore_raw_params(workdir, abstract_trainable(saved, like, part), step)
    adapters = trainable if part is None else trainable[part]
    return jax.tree.map(np.asarray, tree.adapters_of(adapters)), cfg, saved
