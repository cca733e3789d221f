"""A user's trained work is never lost, and every way a run can go wrong says so in one clear message:
each test reproduces a report (issue 18) and checks the fixed behaviour. Export's own guarantees are in
tests/test_export.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import ml_collections
import pytest

from align_jax import checkpoint, stages
from align_jax import workdir as workdir_files
from align_jax.config import ConfigValueError, validate
from align_jax.data.formats import BadRowError
from align_jax.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, NotFoundError
from align_jax.metrics import MetricsWriter, read_metrics
from align_jax.stages import build
from tests.test_configs import load_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
# The same run as `small_sft()`, as command-line flags (the two must stay in step: a resume compares them).
FLAGS = [f"--config.model.{k}={v}" for k, v in MODEL.items()] + [
    "--config.data.seq_len=64",
    "--config.data.batch_size=8",
    "--config.data.eval=",
    "--config.mesh.data=-1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.ckpt_every=2",
    "--config.train.progress=False",
    "--config.train.async_checkpoint=False",
]


def small_sft(steps: int, **model) -> ml_collections.ConfigDict:
    c = load_preset("sft", "tiny")
    c.unlock()
    c.model.update(**{**MODEL, **model})
    c.data.update(seq_len=64, batch_size=8, eval="")
    c.mesh.update(data=-1)
    c.train.update(steps=steps, log_every=1, eval_every=0, ckpt_every=2, progress=False, async_checkpoint=False)
    return c


def launch(workdir, *extra, devices: int = 2, wrapper: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, *wrapper, os.path.join(ROOT, "launch", "train.py"), "--config",
           os.path.join(ROOT, "configs", "sft.py") + ":tiny", "--workdir", str(workdir), *FLAGS, *extra]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(workdir) -> list[int]:
    return [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]


# --- a run's lifecycle: lock, preemption, torn metrics, resume, changed settings ------------------------


@pytest.mark.slow
def test_lock_preemption_torn_metrics_and_resume(tmp_path):
    work = tmp_path / "run"
    proc = launch(work, "--config.train.steps=100000")
    try:
        deadline = time.time() + 300
        while not (work / "metrics.jsonl").is_file() or not (work / "checkpoints" / "2").is_dir():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the run never logged a step"
            time.sleep(0.05)

        # Before: a second run on the workdir either died on an Orbax temp-dir collision or silently trained
        # over the first one's checkpoints. Now it fails at once, naming the holder, and writes nothing.
        before = sorted(os.listdir(work))
        with pytest.raises(workdir_files.WorkdirLocked, match=rf"in use by another run \(pid {proc.pid} on "):
            stages.get("sft").run(small_sft(steps=4), str(work))
        assert sorted(os.listdir(work)) == before

        # Before: SIGTERM saved and exited 0, so a scheduler could not tell a preemption from success.
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["preempted"] is True
    stopped = summary["final_step"]
    assert summary["last_checkpoint"] == stopped and (work / "checkpoints" / str(stopped)).is_dir()

    # Before: a line torn by a kill mid-write made the workdir impossible to resume (json.loads in
    # truncate_after). Now the torn line is dropped with a warning and the run resumes.
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "loss": 1.2')
    summary = stages.get("sft").run(small_sft(steps=stopped + 2), str(work))
    assert summary["init"] == "resumed" and summary["start_step"] == stopped and summary["final_step"] == stopped + 2
    assert logged_steps(work) == list(range(1, stopped + 3))

    # Before: a changed model shape printed ~300 lines of Orbax shape errors ending in advice to pass
    # strict=False. Now the settings are compared first and the error names each differing key.
    with pytest.raises(checkpoint.ResumeMismatchError, match=r"model\.hidden_size: 32 -> 64.*another --workdir"):
        stages.get("sft").run(small_sft(steps=stopped + 4, hidden_size=64), str(work))
    assert latest_step(work) == stopped + 2  # nothing was written


def latest_step(work) -> int | None:
    return checkpoint.latest_step_on_disk(str(work))


def test_lock_is_exclusive_reentrant_and_recovers_from_a_killed_holder(tmp_path, caplog):
    work = str(tmp_path / "w")
    script = (
        "import sys, time\nfrom align_jax.workdir import lock\n"
        "with lock(sys.argv[1], enabled=True):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, work], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(workdir_files.WorkdirLocked, match=f"pid {holder.pid} on "),
            workdir_files.lock(work, enabled=True),
        ):
            pass
    finally:
        holder.kill()  # SIGKILL: no chance to clean up; the kernel drops the flock
        holder.wait()
        holder.stdout.close()
    # Re-entrant in one process (the pas stage runs the sft stage in its own workdir).
    with (
        caplog.at_level(logging.WARNING, logger="align_jax.workdir"),
        workdir_files.lock(work, enabled=True),
        workdir_files.lock(work, enabled=True),
    ):
        pass
    assert any("did not exit cleanly" in r.getMessage() and str(holder.pid) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="align_jax.workdir"), workdir_files.lock(work, enabled=True):
        pass  # the clean exit above left no stale holder behind
    assert not caplog.records


def test_a_bad_config_leaves_no_workdir(tmp_path):
    c = small_sft(steps=2)
    c.optim.warmup_steps = -1  # before: accepted
    with pytest.raises(ConfigValueError, match=r"optim\.warmup_steps=-1 must be >= 0"):
        stages.get("sft").run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# --- checkpoint retention --------------------------------------------------------------------------------


def test_keep_zero_keeps_every_checkpoint_and_negative_is_rejected(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ck = checkpoint.Checkpointer(str(tmp_path / "all"), keep=0, async_save=False)
    for step in range(1, 6):
        ck.save(step, state, {}, {})
    ck.close()
    # Before: LatestN(n=0) deleted every checkpoint, the final one included.
    assert sorted(int(d) for d in os.listdir(tmp_path / "all" / "checkpoints") if d.isdigit()) == [1, 2, 3, 4, 5]
    ck = checkpoint.Checkpointer(str(tmp_path / "one"), keep=1, async_save=False)
    for step in range(1, 4):
        ck.save(step, state, {}, {})
    ck.close()
    assert latest_step(tmp_path / "one") == 3 and [
        d for d in os.listdir(tmp_path / "one" / "checkpoints") if d.isdigit()
    ] == ["3"]
    c = small_sft(steps=2)
    c.train.keep = -1
    with pytest.raises(ConfigValueError, match=r"train\.keep=-1 must be >= 0"):
        validate(c)
    with pytest.raises(ValueError, match="keep=-1"):
        checkpoint.Checkpointer(str(tmp_path / "neg"), keep=-1)


# --- a failed save -----------------------------------------------------------------------------------------

_SAVE_UNDER_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
import jax
from align_jax import checkpoint
ck = checkpoint.Checkpointer(sys.argv[1], keep=3, async_save=sys.argv[2] == "async")
state = {"w": jax.random.normal(jax.random.key(0), (512, 512))}  # 1 MiB, incompressible
ck.save(1, state, {}, {})
ck.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    ck.save(2, state, {}, {})
    ck.close()
except checkpoint.CheckpointSaveError as e:
    print(e)
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_save_is_one_message_naming_the_last_complete_checkpoint(tmp_path, mode):
    work = tmp_path / "w"
    out = subprocess.run([sys.executable, "-c", _SAVE_UNDER_LIMIT, str(work), mode], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    message = out.stdout.strip()
    # Before: ~950 lines of Orbax and TensorStore chains with the reason in the middle.
    ckpts = work / "checkpoints"
    assert message.startswith(f"saving checkpoint step 2 under {ckpts} failed: File too large (errno 27)")
    assert f"Last complete checkpoint: {ckpts}/1;" in message and "\n" not in message
    assert sorted(os.listdir(ckpts)) == ["1"]  # the partial step 2 is removed (it holds the space)


_EXEC_UNDER_LIMIT = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # inherited through exec: writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


@pytest.mark.slow
def test_train_py_reports_a_failed_save_in_one_line(tmp_path):
    proc = launch(tmp_path / "w", "--config.train.steps=2", wrapper=["-c", _EXEC_UNDER_LIMIT])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == USER_ERROR_EXIT_CODE, err[-3000:]
    # Before: ~950 lines (Orbax's background-thread errors, unretrieved asyncio tasks, TensorStore callbacks).
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: saving checkpoint step 2 under ") and "File too large" in last, last
    assert "Last complete checkpoint: none (nothing was saved yet)" in last
    assert os.listdir(tmp_path / "w" / "checkpoints") == []  # the partial save is gone


# --- init_from ----------------------------------------------------------------------------------------------


def test_init_from_a_missing_or_non_model_directory(tmp_path):
    typo = tmp_path / "sft-demo-typo"
    c = small_sft(steps=2)
    c.init_from = str(typo)
    # Before: "Repo id must be in the form 'repo_name'..." from the hub client, and <typo>/checkpoints created.
    with pytest.raises(NotFoundError, match=r"neither a Hugging Face directory .* found no such directory"):
        stages.get("sft").run(c, str(tmp_path / "w"))
    assert not typo.exists() and not (tmp_path / "w").exists()  # checked before the run takes its workdir
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    c.init_from = str(tmp_path / "notes")
    with pytest.raises(NotFoundError, match=r"found a directory holding todo\.txt"):
        stages.get("sft").run(c, str(tmp_path / "w"))
    assert os.listdir(tmp_path / "notes") == ["todo.txt"]
    # Readers of a workdir's checkpoints never create one (export.py --workdir typo did).
    with pytest.raises(NotFoundError, match=r"workdir=.*expected an align_jax stage workdir"):
        checkpoint.read_config(str(typo))
    assert not typo.exists()


def test_init_from_an_unfinished_workdir_warns(tmp_path, caplog):
    work = tmp_path / "sft"
    ck = checkpoint.Checkpointer(str(work), async_save=False)
    ck.save(3, {"w": jnp.zeros(2)}, {}, {})
    ck.close()
    workdir_files.write_summary(str(work), {"preempted": True, "final_step": 3})
    with caplog.at_level(logging.WARNING, logger="align_jax.checkpoint"):
        assert checkpoint.init_from_kind(str(work)) == "workdir"
        checkpoint.init_from_kind(str(work))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "was preempted" in warnings[0] and "step 3" in warnings[0]


# --- the demo tokenizer reads data like the pipeline -------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, friend"}]}


def _demo_config(path, **data):
    c = small_sft(steps=1)
    c.data.update(train=str(path), **data)
    return c


@pytest.mark.parametrize(
    ("lines", "line_no", "match"),
    [
        ([json.dumps(CHAT), "{not json"], 2, "not valid JSON"),
        ([json.dumps(CHAT), "", json.dumps([1, 2])], 3, "expected an object, got list"),
        ([json.dumps(CHAT), json.dumps({"messages": [{"role": "user", "content": 7}]})], 2, r"messages\[0\]\.content"),
    ],
)
def test_demo_tokenizer_bad_rows_name_file_and_line(tmp_path, lines, line_no, match):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    # Before: a raw JSONDecodeError / AttributeError traceback with the wrong line number.
    with pytest.raises(BadRowError, match=match) as info:
        build.load_tokenizer(_demo_config(path), str(tmp_path / "w"))
    assert info.value.file == str(path) and info.value.row == line_no
    tok = build.load_tokenizer(_demo_config(path, on_bad_row="skip"), str(tmp_path / "skip"))
    assert tok.encode("Hello, friend")


def test_demo_tokenizer_reads_bom_blank_lines_invalid_utf8_and_json_arrays(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n\n" + json.dumps(CHAT).encode() + b"\n")
    assert build.load_tokenizer(_demo_config(jsonl), str(tmp_path / "a")).encode("Hi there")
    array = tmp_path / "train.json"
    array.write_text(json.dumps([CHAT, CHAT]))
    assert build.load_tokenizer(_demo_config(array), str(tmp_path / "b")).encode("Hi there")
    broken = tmp_path / "utf8.jsonl"
    broken.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"messages": [{"role": "user", "content": "\xff"}]}\n')
    with pytest.raises(BadRowError) as info:
        build.load_tokenizer(_demo_config(broken), str(tmp_path / "c"))
    assert info.value.row == 2 and "messages[0].content" in str(info.value)


# --- metrics ---------------------------------------------------------------------------------------------------


def test_torn_metrics_lines_are_dropped_with_a_warning(tmp_path, caplog):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]  # the report reads it too
    with caplog.at_level(logging.WARNING, logger="align_jax.metrics"):
        w.truncate_after(2)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert any("line 4" in r.getMessage() for r in caplog.records)
    w.write(3, {"loss": 3.0})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    w.close()
