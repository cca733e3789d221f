"""launch/bench.py keeps its output contract (the final line is the JSON a dashboard reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {
    "tokens_per_s", "mfu", "packing_efficiency", "compile_s", "step_s", "peak_bytes", "n_compiles",
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "seq_len", "batch_size", "n_params", "dtype",
}  # fmt: skip


def test_bench_prints_the_json_contract():
    cmd = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--config", os.path.join(ROOT, "configs", "sft.py") + ":tiny",
           "--steps", "2", "--remat_table", "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
           "--config.model.num_layers=2", "--config.data.seq_len=64", "--config.data.batch_size=8"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) >= KEYS, KEYS - set(result)
    assert result["n_compiles"] == 1 and result["tokens_per_s"] > 0 and result["peak_bytes"] > 0
    assert result["num_layers"] == 2 and result["seq_len"] == 64 and result["batch_size"] == 8
    assert 0.0 < result["packing_efficiency"] <= 1.0  # quality is tested in tests/data
    assert [r["layers_per_unit"] for r in result["remat_table"]] == [1, 1, 2]  # k = 4 does not divide 2 layers
    assert "tok/s" in lines[-2]
