"""A LoRA workdir's adapters as a PEFT adapter directory (`launch/export.py --lora adapter`).

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path, ...
    adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight [r, in]
                                and ...lora_B.weight [out, r], per layer

`peft.PeftModel.from_pretrained(base, DIR)` on the run's base model then computes what our adapted model
does: PEFT adds (lora_alpha / r) B A x to each adapted projection, as models/layers.py does. The base is
the run's init_from (written as base_model_name_or_path); when that is itself a workdir, export it first
(launch/export.py) and load the adapter onto that export. A QLoRA run's adapters were trained on our NF4
rounding of the base, which bitsandbytes' 4-bit loading reproduces up to its double-quantised scales.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from align_jax import outdir
from align_jax.lora import tree
from align_jax.lora.handoff import raw_adapters
from align_jax.models import safetensors_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_SUBLAYER = {"attn": "self_attn", "mlp": "mlp"}


def peft_tensors(adapters: Any, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, array) per layer and adapter leaf: A [in..., r] -> lora_A [r, in]; B [r, out...] ->
    lora_B [out, r] (the flattening of in / out matches models/hf_names.py's weights)."""
    for path, leaf in sorted(tree.flatten(adapters).items()):
        proj = tree.projection_of(path)
        sub = HF_SUBLAYER[tree.PROJECTIONS[proj][0]]
        kind = "lora_A" if path[-1] == "lora_a" else "lora_B"
        leaf = np.asarray(leaf)
        for i in range(leaf.shape[0]):
            x = leaf[i]
            w = x.reshape(-1, x.shape[-1]).T if kind == "lora_A" else x.reshape(x.shape[0], -1).T
            yield f"base_model.model.model.layers.{i}.{sub}.{proj}.{kind}.weight", w.astype(dtype or w.dtype)


def adapter_config(lora: dict, base: str, targets: tuple[str, ...]) -> dict:
    """adapter_config.json's contents (PEFT's LoraConfig fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "r": int(lora["rank"]),
        "lora_alpha": float(lora["alpha"]),
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def is_adapter_export(path: str) -> bool:
    """Whether `path` holds a PEFT adapter directory written here (flat: the two files and nothing else)."""
    with os.scandir(path) as it:
        entries = list(it)
    names = {e.name for e in entries}
    return names == {ADAPTER_CONFIG, ADAPTER_WEIGHTS} and all(e.is_file(follow_symlinks=False) for e in entries)


def check_adapter_target(out_dir: str, overwrite: bool = False) -> None:
    outdir.check_replaceable(out_dir, kind="PEFT adapter export", is_ours=is_adapter_export, overwrite=overwrite)


def save_adapter(
    workdir: str, out_dir: str, step: int | None = None, dtype: str | None = None, *, overwrite: bool = False
) -> str:
    """Writes `workdir`'s adapters (latest step, or `step`) to `out_dir` in PEFT's format; returns it.
    Written beside the target, then renamed into place: never a half-written directory."""
    from align_jax.config.sections import lora_targets

    out_dir = os.path.abspath(out_dir)
    check_adapter_target(out_dir, overwrite)
    adapters, _, saved = raw_adapters(workdir, step)
    config = saved["config"]
    lora, init_from = config["lora"], config.get("init_from") or ""
    base = os.path.abspath(init_from) if init_from and os.path.isdir(init_from) else init_from
    with outdir.staged(out_dir, check=lambda: check_adapter_target(out_dir, overwrite)) as tmp:
        safetensors_io.write(
            os.path.join(tmp, ADAPTER_WEIGHTS), peft_tensors(adapters, np.dtype(dtype) if dtype else None)
        )
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config(lora, base, lora_targets(lora["targets"])), f, indent=2)
    return out_dir
