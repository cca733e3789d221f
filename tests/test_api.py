"""The public API stays small and stable, and compiles once per shape."""

from __future__ import annotations

import jax
import numpy as np

import align_jax as aj
from align_jax.models import transformer


def test_public_names():
    for name in ("load_pretrained", "save_pretrained", "forward", "ModelConfig", "make_mesh", "Sharder"):
        assert hasattr(aj, name), name


def test_forward_compiles_once_per_shape():
    cfg = aj.ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    params = aj.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    before = transformer._forward._cache_size()
    for _ in range(5):  # new token values, same shape: no new compilation
        logits = aj.forward(cfg, params, rng.integers(0, 50, size=(2, 12)))
    assert transformer._forward._cache_size() == before + 1
    aj.forward(cfg, params, rng.integers(0, 50, size=(2, 16)))
    assert transformer._forward._cache_size() == before + 2
    assert logits.dtype == np.float32 and logits.shape == (2, 12, 50)
