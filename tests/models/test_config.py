"""ModelConfig: validation, HF config.json mapping in both rope encodings, parameter count."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import transformers

import align_jax as aj
from align_jax.models.hf_config import from_hf_dict, to_hf_dict
from tests import hf_models


@pytest.mark.parametrize("family", list(hf_models.TINY))
def test_hf_config_round_trip(family):
    spec = hf_models.TINY[family]
    hf = spec["cls"](**{**hf_models.COMMON, **spec["kw"]})
    cfg = from_hf_dict(hf.to_dict())
    again = from_hf_dict(to_hf_dict(cfg))
    assert again == cfg
    # transformers reads what we write back to the same architecture.
    reread = transformers.AutoConfig.for_model(**to_hf_dict(cfg))
    assert from_hf_dict(reread.to_dict()) == cfg


def test_both_rope_encodings_read_the_same():
    legacy = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": 500000.0}
    a, b = from_hf_dict(legacy), from_hf_dict(v5)
    assert a == b and a.rope_scaling == ("llama3", 32.0, 1.0, 4.0, 8192) and a.rope_theta == 500000.0
    assert a.num_kv_heads == 2  # absent num_key_value_heads means multi-head attention


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_heads=4, num_kv_heads=3), "not a multiple of num_kv_heads"),
        (dict(num_layers=3, layers_per_unit=2), "must divide num_layers"),
        (dict(remat_policy="everything"), "remat_policy='everything'"),
        (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
        (dict(dtype="float33"), "dtype='float33' is not a dtype"),
        (dict(attention_impl="bogus"), "attention_impl='bogus'"),
        (dict(sliding_window=0), "sliding_window must be positive"),
    ],
)
def test_validation(changes, message):
    with pytest.raises(aj.ConfigError, match=message):
        aj.ModelConfig(**changes)


def test_missing_field_names_it():
    with pytest.raises(aj.ConfigError, match="required field 'intermediate_size' is missing"):
        from_hf_dict(
            {"model_type": "llama", "vocab_size": 3, "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}
        )


@pytest.mark.parametrize(
    "changes",
    [dict(), dict(tie_word_embeddings=True), dict(qkv_bias=True, o_bias=True, mlp_bias=True), dict(head_dim=24)],
)
def test_num_params_matches_the_tree(changes):
    cfg = aj.ModelConfig(**changes)
    shapes = jax.eval_shape(functools.partial(aj.init_params, cfg), jax.random.key(0))
    assert cfg.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert cfg.num_params(include_embedding=False) == cfg.num_params() - cfg.vocab_size * cfg.hidden_size
