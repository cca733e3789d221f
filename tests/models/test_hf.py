"""Hugging Face interop: logits parity per family, round trips, sharded files, and bad checkpoints."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import transformers

import align_jax as aj
from align_jax.models import safetensors_io
from align_jax.sharding import Sharder, make_mesh
from tests import hf_models

# fp32 on both sides; the two frameworks order their reductions differently, so logits agree to
# float32 rounding (~1e-7 absolute on values of magnitude ~1), not bit for bit. 1e-5 relative to the
# largest logit leaves a 50x margin and still catches any mapping or masking mistake (those are >1e-2).
RTOL = 1e-5
FAMILIES = list(hf_models.TINY)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)


def tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, hf_models.COMMON["vocab_size"], size=(batch, length))


def assert_close_logits(ours, ref):
    err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"max relative logits error {err:.2e} >= {RTOL}"
    return err


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model_dir(request, tmp_path_factory):
    model = hf_models.build(request.param)
    path = hf_models.save(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, path


def test_logits_parity(hf_model_dir):
    _, model, path = hf_model_dir
    cfg, params = aj.load_pretrained(path, dtype="float32")
    toks = tokens()
    assert_close_logits(aj.forward(cfg, params, toks), hf_models.torch_logits(model, toks))


def test_parity_exercises_the_family_feature(hf_model_dir):
    """The parity test would fail without the feature it names (window, llama3 scaling, bias)."""
    family, model, path = hf_model_dir
    cfg, params = aj.load_pretrained(path, dtype="float32")
    toks = tokens()
    ref = hf_models.torch_logits(model, toks)
    changed = {
        "llama": dict(rope_scaling=None),
        "mistral": dict(sliding_window=None),
        "qwen2": dict(rope_theta=10000.0),
        "llama_bias": dict(rope_theta=1.0),
        "qwen3": dict(qk_norm=False),
        "gemma2": [dict(attn_softcap=None), dict(final_softcap=None), dict(embed_scale=False)],
        "gemma3": dict(rope_local_theta=None),
        "qwen3_moe": dict(norm_topk_prob=True),
        "mixtral": dict(num_experts_per_tok=1),
    }[family]
    if family == "qwen3":  # without q/k norms the tree has two unused leaves; drop them
        attn = params["layers"]["stack"]["attn"]
        params["layers"]["stack"]["attn"] = {k: v for k, v in attn.items() if k not in ("q_norm", "k_norm")}
    for change in changed if isinstance(changed, list) else [changed]:
        wrong = np.asarray(aj.forward(cfg.replace(**change), params, toks))
        assert np.abs(wrong - ref).max() / np.abs(ref).max() > 1e-3, change


def test_packed_rows_equal_each_sequence_alone(hf_model_dir):
    """Two sequences packed in one row (positions restart, segment ids differ) give each sequence's own
    logits from transformers: nothing leaks across the boundary, in any family."""
    _, model, path = hf_model_dir
    cfg, params = aj.load_pretrained(path, dtype="float32")
    a, b = tokens(1, 9, seed=2)[0], tokens(1, 13, seed=3)[0]
    row = np.concatenate([a, b, [0, 0]])[None]
    positions = np.concatenate([np.arange(9), np.arange(13), [0, 0]])[None]
    segments = np.concatenate([np.full(9, 1), np.full(13, 2), [0, 0]])[None]
    ours = np.asarray(aj.forward(cfg, params, row, positions, segments))[0]
    assert_close_logits(ours[:9], hf_models.torch_logits(model, a[None])[0])
    assert_close_logits(ours[9:22], hf_models.torch_logits(model, b[None])[0])


def test_round_trip_through_save_pretrained(hf_model_dir, tmp_path):
    _, model, path = hf_model_dir
    cfg, params = aj.load_pretrained(path, dtype="float32")
    out = aj.save_pretrained(cfg, params, tmp_path / "export")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    toks = tokens(seed=1)
    # Same weights, same framework: bit-identical logits.
    np.testing.assert_array_equal(hf_models.torch_logits(reloaded.eval(), toks), hf_models.torch_logits(model, toks))
    cfg2, params2 = aj.load_pretrained(out, dtype="float32")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_safetensors_both_ways(tmp_path):
    model = hf_models.build("qwen2", seed=3)
    src = hf_models.save(model, tmp_path / "src", max_shard_size="40KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    cfg, params = aj.load_pretrained(src, dtype="float32")
    toks = tokens(seed=2)
    assert_close_logits(aj.forward(cfg, params, toks), hf_models.torch_logits(model, toks))

    out = aj.save_pretrained(cfg, params, tmp_path / "out", max_shard_bytes=50_000)
    index = read_json(os.path.join(out, "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all(os.path.isfile(os.path.join(out, f)) for f in files)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    np.testing.assert_array_equal(hf_models.torch_logits(reloaded.eval(), toks), hf_models.torch_logits(model, toks))


def test_bf16_export_and_dtype_cast(tmp_path):
    model = hf_models.build("llama", seed=4)
    src = hf_models.save(model, tmp_path / "src")
    cfg, params = aj.load_pretrained(src, dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    out = aj.save_pretrained(cfg, params, tmp_path / "bf16")
    assert read_json(os.path.join(out, "config.json"))["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="float32")
    ref_w = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    got_w = reloaded.model.layers[0].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-2, atol=1e-3)  # bf16 rounding only


def test_load_places_each_tensor_in_its_sharding(tmp_path):
    model = hf_models.build("llama", seed=5)
    src = hf_models.save(model, tmp_path / "src")
    sharder = Sharder(make_mesh({"fsdp": 2, "tensor": 4}))
    cfg, params = aj.load_pretrained(src, dtype="float32", sharder=sharder)
    _, plain = aj.load_pretrained(src, dtype="float32")
    up = params["layers"]["stack"]["mlp"]["up_proj"]["kernel"]  # [L, E, F]: (layers, embed, mlp)
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 24, 24)
    jax.tree.map(np.testing.assert_array_equal, params, plain)
    toks = tokens(batch=8, seed=6)
    assert_close_logits(aj.forward(cfg, params, toks, sharder=sharder), hf_models.torch_logits(model, toks))


def test_export_is_atomic_and_replaces_old(tmp_path, monkeypatch):
    model = hf_models.build("llama_bias", seed=6)
    cfg, params = aj.load_pretrained(hf_models.save(model, tmp_path / "src"))
    out = tmp_path / "export"
    aj.save_pretrained(cfg, params, out)
    before = sorted(os.listdir(out))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        aj.save_pretrained(cfg, params, out, overwrite=True)
    # The old export is untouched and no temporary directory is left beside it.
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["export", "src"]
    monkeypatch.undo()
    aj.save_pretrained(cfg, params, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export", "src"]


# --- bad checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    return hf_models.save(hf_models.build("llama", seed=7), tmp_path / "good")


def _rewrite(path, edit):
    f = safetensors_io.SafetensorsFile(os.path.join(path, "model.safetensors"))
    tensors = edit({k: np.array(f[k]) for k in f.names()})
    safetensors_io.write(os.path.join(path, "model.safetensors"), tensors.items())


def test_unsupported_architecture(good_dir):
    p = os.path.join(good_dir, "config.json")
    d = read_json(p)
    d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    write_json(d, p)
    with pytest.raises(aj.ConfigError, match=r"unsupported architecture model_type='gpt2'.*GPT2LMHeadModel"):
        aj.load_pretrained(good_dir)


def test_unsupported_rope_scaling(good_dir):
    p = os.path.join(good_dir, "config.json")
    d = read_json(p)
    d.pop("rope_parameters", None)
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    write_json(d, p)
    with pytest.raises(aj.ConfigError, match="rope scaling type 'yarn' is not supported"):
        aj.load_pretrained(good_dir)


def test_missing_tensor(good_dir):
    _rewrite(good_dir, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(aj.CheckpointFormatError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        aj.load_pretrained(good_dir)


def test_unexpected_tensor(good_dir):
    _rewrite(good_dir, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(12, np.float32)})
    with pytest.raises(
        aj.CheckpointFormatError, match=r"unexpected tensors \['model.layers.0.self_attn.q_norm.weight'\]"
    ):
        aj.load_pretrained(good_dir)


def test_shape_mismatch(good_dir):
    _rewrite(good_dir, lambda t: {**t, "model.layers.0.mlp.down_proj.weight": np.zeros((48, 95), np.float32)})
    with pytest.raises(
        aj.CheckpointFormatError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape \[48, 95\], but config.json implies \[48, 96\]",
    ):
        aj.load_pretrained(good_dir)


def test_no_weights_and_no_config(tmp_path, good_dir):
    os.remove(os.path.join(good_dir, "model.safetensors"))
    with pytest.raises(aj.CheckpointFormatError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        aj.load_pretrained(good_dir)
    with pytest.raises(aj.ConfigError, match=r"no config\.json"):
        aj.load_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    src = hf_models.save(hf_models.build("llama", seed=8), tmp_path / "src", max_shard_size="40KB")
    index = read_json(os.path.join(src, "model.safetensors.index.json"))
    os.remove(os.path.join(src, sorted(set(index["weight_map"].values()))[-1]))
    with pytest.raises(
        aj.CheckpointFormatError, match=r"names model-0000\d-of-0000\d.safetensors, which does not exist"
    ):
        aj.load_pretrained(src)
