"""Exporting a LoRA run (launch/export.py --lora merged | adapter): the merged HF directory loads in
transformers, the adapter directory loads in PEFT onto the HF base, and both give our adapted model's
logits. The run is a LoRA workdir written directly (a checkpoint with non-zero adapters on a tiny random
HF Llama): no training needed to make the adapters matter."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from align_jax import checkpoint
from align_jax.config import base_config
from align_jax.config.sections import lora_fields
from align_jax.lora import tree
from align_jax.models import safetensors_io
from align_jax.models.hf import load_pretrained
from align_jax.models.hf_config import read_hf_config
from align_jax.models.transformer import Decoder, default_positions, init_params
from align_jax.stages import build
from align_jax.train.state import TrainState
from tests import hf_models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
from export import export

RTOL = 1e-5  # fp32 both sides: relative to the largest logit (as tests/models/test_hf.py)
TARGETS = "q_proj,v_proj,o_proj,up_proj,down_proj"  # not all seven: PEFT must see which


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    model = hf_models.build("llama")
    return model, hf_models.save(model, tmp_path_factory.mktemp("base"))


def lora_workdir(hf_dir: str, workdir: str, quantize: str = "none"):
    """A finished LoRA SFT run on `hf_dir` as the stage would save it, with random non-zero adapters.
    Returns (adapters, the run's model config)."""
    c = base_config("sft")
    c.init_from, c.data.train = hf_dir, "demo:sft_train"
    c.lora.update(rank=4, alpha=8.0, targets=TARGETS, quantize=quantize, block_size=16)
    cfg = read_hf_config(hf_dir, param_dtype="float32", dtype="float32", **lora_fields(c))
    adapters, _ = tree.split(init_params(cfg, jax.random.key(1)))
    flat = tree.flatten(adapters)
    for i, path in enumerate(sorted(flat)):
        if path[-1] == "lora_b":  # a fresh B is zero: give it values, or the export tests nothing
            flat[path] = 0.3 * jax.random.normal(jax.random.key(10 + i), flat[path].shape)
    adapters = tree.unflatten(flat)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    ckpt.save(5, TrainState.create(adapters, optax.adam(1e-3), 0), {}, build.saved_config(c, cfg))
    ckpt.close()
    return adapters, cfg


def tokens():
    return np.random.default_rng(0).integers(0, hf_models.COMMON["vocab_size"], size=(2, 20))


def our_logits(cfg, adapters, hf_dir, quantize="none"):
    _, base = load_pretrained(hf_dir, dtype="float32")
    if quantize != "none":
        base = tree.frozen_base(base, quantize=quantize, block_size=16, param_dtype="float32", compute_dtype="float32")
    t = jnp.asarray(tokens(), jnp.int32)
    return np.asarray(
        Decoder(cfg).apply({"params": tree.merge(adapters, base)}, t, default_positions(t), jnp.ones_like(t))
    )


def assert_close(ours, ref):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"max relative logits error {err:.2e} >= {RTOL}"


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_merged_export_loads_in_transformers_with_our_adapted_logits(hf_base, tmp_path, quantize):
    model, hf_dir = hf_base
    work = str(tmp_path / "run")
    adapters, cfg = lora_workdir(hf_dir, work, quantize)
    out = export(work, str(tmp_path / "merged"))  # --lora merged is the default
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ours = our_logits(cfg, adapters, hf_dir, quantize)
    assert_close(ours, hf_models.torch_logits(merged, tokens()))
    # The adapters matter: the base's logits are far from these.
    assert np.abs(hf_models.torch_logits(model, tokens()) - ours).max() > 1e-2 * np.abs(ours).max()
    with open(os.path.join(out, "config.json")) as f:
        assert "lora" not in json.dumps(json.load(f))  # a plain model of the base architecture


def test_adapter_export_loads_in_peft_with_our_adapted_logits(hf_base, tmp_path):
    from peft import PeftModel

    _, hf_dir = hf_base
    work = str(tmp_path / "run")
    adapters, cfg = lora_workdir(hf_dir, work)
    out = export(work, str(tmp_path / "adapter"), lora="adapter")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    with open(os.path.join(out, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert conf["target_modules"] == TARGETS.split(",") and conf["base_model_name_or_path"] == os.path.abspath(hf_dir)
    f = safetensors_io.SafetensorsFile(os.path.join(out, "adapter_model.safetensors"))
    h, e = hf_models.COMMON["hidden_size"], hf_models.COMMON["num_attention_heads"]
    assert f.shape("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == (4, h)
    assert f.shape("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight") == (h, 4)
    assert f.shape("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight") == (
        4,
        hf_models.COMMON["intermediate_size"],
    )
    assert not any(".k_proj." in n for n in f.names()) and e == 4
    assert len(f.names()) == 2 * 5 * 2  # A and B x 5 projections x 2 layers

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    plain = hf_models.torch_logits(base, tokens())
    peft_model = PeftModel.from_pretrained(base, out).eval()
    got = hf_models.torch_logits(peft_model, tokens())
    assert_close(our_logits(cfg, adapters, hf_dir), got)
    assert np.abs(got - plain).max() > 1e-2 * np.abs(got).max()  # PEFT really applied them
    # The adapter directory is not an HF model directory: overwriting needs a previous adapter export.
    with pytest.raises(FileExistsError):
        export(work, str(tmp_path / "adapter"), lora="adapter")
    export(work, str(tmp_path / "adapter"), lora="adapter", overwrite=True)


def test_adapter_export_of_a_full_run_is_refused(hf_base, tmp_path):
    _, hf_dir = hf_base
    work = str(tmp_path / "plain")
    c = base_config("sft")
    c.init_from, c.data.train = hf_dir, "demo:sft_train"
    cfg = read_hf_config(hf_dir, param_dtype="float32", dtype="float32")
    ckpt = checkpoint.Checkpointer(work, async_save=False)
    ckpt.save(
        1, TrainState.create(init_params(cfg, jax.random.key(0)), optax.sgd(0.1), 0), {}, build.saved_config(c, cfg)
    )
    ckpt.close()
    with pytest.raises(ValueError, match="not a LoRA run"):
        export(work, str(tmp_path / "adapter"), lora="adapter")
    with pytest.raises(ValueError, match="--lora='both'"):
        export(work, str(tmp_path / "x"), lora="both")
