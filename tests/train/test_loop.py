"""The loop's stopping behaviour: NaN stops with the last good checkpoint kept; SIGTERM saves and
returns; every logged row has what a user reads (loss, learning rate, throughput)."""

from __future__ import annotations

import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from align_jax.checkpoint import Checkpointer
from align_jax.metrics import MetricsWriter, read_metrics
from align_jax.train import loop
from align_jax.train.state import TrainState


def fake_state():
    return TrainState(
        step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state={}, rng=jnp.zeros(2, jnp.uint32)
    )


def hooks(on_step=None):
    calls = {"n": 0}

    def step_fn(state, batch):
        calls["n"] += 1
        n = calls["n"]
        finite = 1
        if on_step is not None:
            finite = on_step(n)
        new = state.replace(step=state.step + 1, params={"w": state.params["w"] + 1})
        return new, {"loss": jnp.float32(1.0 / n), "grad_norm": jnp.float32(0.5), "finite": jnp.int32(finite)}

    def next_batch(state):
        seg = np.ones((2, 8), np.int32)
        seg[1, 6:] = 0
        host = {"tokens": np.arange(16).reshape(2, 8), "segment_ids": seg}
        return host, loop.batch_stats(host)

    return loop.LoopHooks(
        step_fn=step_fn,
        next_batch=next_batch,
        data_state=lambda: {"position": calls["n"]},
        flops_per_token=lambda ctx: 1000.0,
        learning_rate=lambda step: 0.1 * step,
    )


def run_loop(tmp_path, h, steps=6, ckpt_every=2):
    ck = Checkpointer(str(tmp_path), async_save=False)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    cfg = loop.LoopConfig(total_steps=steps, log_every=1, ckpt_every=ckpt_every, progress=False)
    try:
        return loop.run(fake_state(), start_step=0, cfg=cfg, hooks=h, checkpointer=ck, writer=writer), ck
    finally:
        ck.close()


def test_logged_rows(tmp_path):
    (_, summary), ck = run_loop(tmp_path, hooks())
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["learning_rate"] == pytest.approx(0.2)  # step 3 ran with the rate of index 2
    assert rows[0]["batch_packing_efficiency"] == pytest.approx(14 / 16)
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["tflops_per_s"] > 0
    assert summary["final_step"] == 6 and not summary["preempted"] and summary["last_checkpoint"] == 6
    assert ck.all_steps() == [2, 4, 6][-3:]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteError, match=r"step 5: .*not finite.*Last good checkpoint: .*checkpoints/4"):
        run_loop(tmp_path, hooks(on_step=lambda n: 0 if n == 5 else 1), steps=8)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2, 4]  # nothing saved at or after the bad step


def test_sigterm_saves_and_returns(tmp_path):
    def on_step(n):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return 1

    previous = signal.getsignal(signal.SIGTERM)
    (_, summary), ck = run_loop(tmp_path, hooks(on_step), steps=10, ckpt_every=0)
    assert summary["preempted"] and summary["final_step"] == 3 and summary["last_checkpoint"] == 3
    assert ck.latest_step() == 3
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is removed again


def test_sigterm_on_a_checkpoint_step_saves_once(tmp_path):
    # Before: the step's regular save and the preemption save collided (StepAlreadyExistsError).
    def on_step(n):
        if n == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return 1

    (_, summary), ck = run_loop(tmp_path, hooks(on_step), steps=10, ckpt_every=2)
    assert summary["preempted"] and summary["final_step"] == 4 and summary["last_checkpoint"] == 4
    assert ck.all_steps() == [2, 4]


def test_nan_on_a_checkpoint_step_is_not_saved(tmp_path):
    h = hooks(on_step=lambda n: 0 if n == 4 else 1)
    ck = Checkpointer(str(tmp_path), async_save=False)
    cfg = loop.LoopConfig(total_steps=8, log_every=100, ckpt_every=2, progress=False)
    with pytest.raises(loop.NonFiniteError, match=r"step 4: .*checkpoints/2"):
        loop.run(
            fake_state(),
            start_step=0,
            cfg=cfg,
            hooks=h,
            checkpointer=ck,
            writer=MetricsWriter(str(tmp_path), tensorboard=False),
        )
    ck.close()
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
