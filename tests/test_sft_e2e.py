"""The SFT stage end to end, through the real entry points."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import align_jax as aj
from align_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough for seconds per run; 4 fake devices on a data x fsdp mesh so the path is sharded.
TINY = [
    "--config.model.hidden_size=64",
    "--config.model.intermediate_size=128",
    "--config.model.num_layers=2",
    "--config.data.seq_len=128",
    "--config.data.batch_size=8",
    "--config.data.eval_batches=2",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.train.log_every=1",
    "--config.train.progress=False",
]


def train_cmd(workdir, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config", os.path.join(ROOT, "configs", "sft.py") + ":tiny",
            "--workdir", str(workdir), *TINY, *extra]  # fmt: skip


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    e["JAX_PLATFORMS"] = "cpu"
    return e


def run(cmd, **kw):
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out


def losses(workdir):
    return {r["step"]: (r["loss"], r["batch_fingerprint"]) for r in read_metrics(str(workdir)) if "loss" in r}


@pytest.mark.slow
def test_train_then_export_loads_in_transformers(tmp_path):
    import torch
    import transformers

    work = tmp_path / "sft"
    run(train_cmd(work, "--config.train.steps=6", "--config.train.eval_every=3", "--config.train.ckpt_every=3"))
    rows = read_metrics(str(work))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sum("eval_loss" in r for r in rows) == 2  # steps 3 and 6
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert os.path.isdir(work / "tensorboard") and os.listdir(work / "tensorboard")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["final_step"] == 6 and summary["init"] == "scratch"

    out = tmp_path / "hf"
    run([sys.executable, os.path.join(ROOT, "launch", "export.py"), "--workdir", str(work), "--out", str(out)])
    assert (out / "tokenizer_config.json").is_file() and (out / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True, tokenize=False
    )
    ids = np.asarray([tok(ids, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    cfg, params = aj.load_pretrained(out, dtype="float32")
    ours = np.asarray(aj.forward(cfg, params, ids))
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    steps = ["--config.train.steps=10", "--config.train.ckpt_every=5", "--config.train.eval_every=0",
             "--config.data.eval=", "--config.train.async_checkpoint=False"]  # fmt: skip
    full = tmp_path / "full"
    run(train_cmd(full, *steps))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *steps), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt5 = killed / "checkpoints" / "5"
    deadline = time.time() + 300
    while not (ckpt5.is_dir() and (ckpt5 / "_CHECKPOINT_METADATA").exists()) and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint at step 5"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # If the kill landed after later checkpoints, drop them: the point is resuming from step 5.
    for d in (killed / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > 5:
            shutil.rmtree(d)
    run(train_cmd(killed, *steps))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["init"] == "resumed" and summary["start_step"] == 5
    got, want = losses(killed), losses(full)
    assert sorted(got) == list(range(1, 11))
    # Same examples in the same order, and bitwise-equal losses: on CPU, XLA is deterministic and the
    # resumed state (params, optimizer, rng, data position) is exactly the saved one.
    assert got == want


def test_no_recompilation_on_mixed_length_data(tmp_path):
    from align_jax.stages import runner, sft
    from tests.test_configs import load_preset

    config = load_preset("sft", "tiny")
    config.unlock()
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=1)
    config.data.update(seq_len=64, batch_size=8)
    config.train.steps = 20
    r = runner.Run(sft.spec, config, str(tmp_path))

    state, _, _ = r.initial_state(None)
    r.start_feed()
    fills = set()
    try:
        for _ in range(20):
            batch, stats = r.next_batch(state)
            fills.add(stats["real_tokens"])
            state, metrics = r.step_fn(state, batch)
        jax.block_until_ready(metrics)
    finally:
        r.feed.close()
    assert len(fills) > 1  # the batches really differ in content
    assert r.step_fn._cache_size() == 1
