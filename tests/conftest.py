"""Test setup shared by the whole suite.

8 fake CPU devices so every sharding test runs anywhere; this must happen before jax is imported,
which is why it is at the top of the first file pytest loads.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
# Parity tests compare float32 numbers against PyTorch; keep XLA's default full-precision fp32 dots.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"
