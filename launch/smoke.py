"""Smoke run: a tiny Llama-family model through init, sharded forward, HF export and reload.

    python launch/smoke.py [--out DIR]

Builds the model straight into its shardings over every local device (a data x fsdp mesh), runs a
forward pass, writes a Hugging Face directory, reads it back and checks the logits agree. Prints one
line; exits non-zero if anything disagrees. The SFT demo replaces this as the README's main job.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import align_jax as aj
from align_jax.host import tune_host_allocator


def main() -> int:
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the HF export (default: a temp dir)")
    args = parser.parse_args()

    start = time.perf_counter()
    n = jax.device_count()
    fsdp = 2 if n % 2 == 0 else 1
    sharder = aj.Sharder(aj.make_mesh({"data": n // fsdp, "fsdp": fsdp}))
    cfg = aj.ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4,
        num_heads=8, num_kv_heads=2, dtype="float32", remat_policy="full", layers_per_unit=2,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    params = aj.init_params(cfg, jax.random.key(0), sharder)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(max(2, n), 64))
    logits = np.asarray(aj.forward(cfg, params, tokens, sharder=sharder))

    with tempfile.TemporaryDirectory() as tmp:
        out = aj.save_pretrained(cfg, params, args.out or os.path.join(tmp, "export"))
        cfg2, params2 = aj.load_pretrained(out, dtype="float32", sharder=sharder)
        logits2 = np.asarray(aj.forward(cfg2, params2, tokens, sharder=sharder))
    err = float(np.abs(logits - logits2).max())
    ok = err == 0.0 and np.isfinite(logits).all()
    print(
        f"align_jax smoke: {'OK' if ok else 'FAILED'} | {cfg.num_params() / 1e6:.2f}M params, "
        f"{n} {jax.default_backend()} device(s), mesh {dict(sharder.mesh.shape)} | "
        f"export round trip max |dlogit| = {err:.1e} | {time.perf_counter() - start:.1f}s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
