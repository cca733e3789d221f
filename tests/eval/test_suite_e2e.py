"""evaluate_model and launch/evaluate.py end to end on a tiny SFT model trained for a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align_jax import stages
from align_jax.chat import ChatModel
from align_jax.eval.suite import evaluate_model
from tests.test_configs import load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT workdir, evaluated on 2 batches of demo:sft_eval while training."""
    work = str(tmp_path_factory.mktemp("sft"))
    c = load_preset("sft", "tiny")
    c.unlock()
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    c.data.update(seq_len=128, batch_size=8, eval_batches=2)
    c.mesh.update(data=-1, fsdp=2)
    c.train.update(steps=8, progress=False, log_every=4, eval_every=8, ckpt_every=0, async_checkpoint=False)
    return work, stages.get("sft").run(c, work)


def test_evaluate_model_on_a_trained_workdir(sft_run):
    work, summary = sft_run
    model = ChatModel.load(work, batch_size=8)
    details = {}
    got = evaluate_model(
        model,
        constraints="demo",
        sft_eval="demo:sft_eval",
        limit=8,
        max_new_tokens=16,
        seq_len=128,
        batch_size=8,
        ppl_batches=2,
        details=details,
    )
    # The same rows, packing, mask and loss as the SFT stage's own eval: the same number.
    assert got["nll"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert got["token_acc"] == pytest.approx(summary["final_eval_accuracy"], rel=1e-5)
    assert got["ppl"] == pytest.approx(2.718281828 ** got["nll"], rel=1e-9)
    for key in ("constraints/prompt_acc", "constraints/instruction_acc"):
        assert 0.0 <= got[key] <= 1.0
    assert all(isinstance(v, float) for v in got.values())
    assert len(details["constraints/examples"]) == 6


def test_cli_prints_the_metrics(sft_run, tmp_path):
    work, _ = sft_run
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch", "evaluate.py"),
        "--model",
        work,
        "--constraints",
        "general",
        "--limit",
        "3",
        "--max_new_tokens",
        "8",
        "--out",
        str(out),
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(printed) >= {"constraints/prompt_acc", "constraints/instruction_acc"}
    saved = json.loads(out.read_text())
    assert saved["metrics"] == printed and saved["model"] == work and len(saved["constraints/examples"]) == 3
