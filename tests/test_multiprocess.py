"""Multi-process training, as on a TPU pod slice or a multi-host GPU cluster, on this machine: 2 processes
of 4 fake CPU devices each (`jax.distributed` on localhost, gloo collectives) against 1 process of 8,
through launch/train.py.

One command, the pipeline's training stages sft -> dpo -> grpo at tiny shapes, runs three times (the
module fixture `runs`; each subprocess gets a clean environment, not this suite's 8-device XLA_FLAGS):
  single   1 process x 8 devices, reading the 2 data shards the 2 processes read (ALIGN_JAX_DATA_SHARDS=2);
  cut      2 processes x 4 devices; process 1 gets SIGTERM during SFT: both stop at the same step, one
           checkpoint is written, both exit 75 (preempted);
  resumed  the same 2-process command again: SFT resumes from that checkpoint on both processes, then DPO
           (init_from the SFT workdir) and GRPO (rollouts from prompts split between the processes).
`single` overlaps `cut` and `resumed` in time. The 2-process losses, batches (fingerprints of the whole
global batch) and rewards must equal the single process's, step by step, across the preemption.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from align_jax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_STEPS, DPO_STEPS, GRPO_STEPS = 12, 3, 3
TIMEOUT_S = 600  # per wait; a hang fails the test (and kills every process) instead of blocking CI


def stage_args(stage: str, **settings) -> list[str]:
    return [f"--config.{stage}.{k}={v}" for k, v in settings.items()]


def pipeline_args(tokenizer: str) -> list[str]:
    quiet = {"train.log_every": 1, "train.progress": False, "train.eval_every": 0, "train.ckpt_every": 0}
    return [
        "--config", os.path.join(ROOT, "configs", "pipeline.py") + ":tiny",
        "--config.stages=sft,dpo,grpo",
        "--config.grpo.rm_workdir=",  # the pipeline's RM stage is not run here
        *stage_args("sft", tokenizer=tokenizer, **{"model.hidden_size": 64, "model.intermediate_size": 128},
                    **{"model.num_layers": 2, "data.seq_len": 128, "data.batch_size": 8, "data.eval": ""},
                    **{"train.steps": SFT_STEPS}, **quiet),
        # DPO evaluates once at its end (the eval split, every process its slice of each eval batch).
        *stage_args("dpo", **{"data.seq_len": 128, "data.batch_size": 8, "data.eval_batches": 1},
                    **{"train.steps": DPO_STEPS}, **quiet),
        # 4 prompts x 4 samples per rollout, 2 prompts per process; PTX batches from the SFT chats; greedy
        # eval on 16 prompts at the end.
        *stage_args("grpo", **{"data.batch_size": 16, "max_new_tokens": 8, "eval_prompts": 16},
                    **{"train.steps": GRPO_STEPS}, **quiet),
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clean_env(devices: int, cache: str, **extra: str) -> dict[str, str]:
    """This environment without the suite's 8-device flag or any distributed settings of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "ALIGN_JAX_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
        # One per device layout: the resumed 2-process run reuses the programs the first one compiled.
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        **extra,
    )
    return env


class Job:
    """One command in `processes` processes (each in its own process group, output to files)."""

    def __init__(self, name: str, workdir: str, args: list[str], processes: int, cache: str, logs: str, **env):
        self.name, self.workdir, self.procs, self.logs = name, workdir, [], []
        port = free_port()
        for i in range(processes):
            cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--workdir", workdir, *args]
            if processes > 1:
                cmd += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}", f"--process_id={i}"]
            log = os.path.join(logs, f"{name}.{i}.log")
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        cmd,
                        env=clean_env(8 // processes, cache, **env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=ROOT,
                    )
                )

    def output(self) -> str:
        parts = []
        for i, log in enumerate(self.logs):
            with open(log) as f:
                lines = [ln for ln in f.read().splitlines() if not ln.startswith("[Gloo]")]
            parts.append(f"--- {self.name} process {i} (exit {self.procs[i].poll()})\n" + "\n".join(lines[-60:]))
        return "\n".join(parts)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, deadline: float) -> list[int]:
        """Exit codes; on a timeout every process is killed and the test fails with both outputs."""
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self.name} did not finish in time\n{self.output()}")
        return [p.returncode for p in self.procs]

    def expect(self, codes: list[int], deadline: float) -> None:
        got = self.wait(deadline)
        assert got == codes, f"{self.name}: exit codes {got}, expected {codes}\n{self.output()}"


def wait_for_step(path: str, step: int, job: Job, deadline: float) -> None:
    while True:
        if os.path.isfile(path):
            with open(path) as f:
                if any(json.loads(line).get("step", 0) >= step for line in f if line.endswith("\n")):
                    return
        if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"{job.name}: no step {step} in {path}\n{job.output()}")
        time.sleep(0.02)


def checkpoint_listing(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def sft_tokenizer(out: str) -> str:
    """configs/sft.py:tiny's demo tokenizer, trained once here instead of in each process that starts SFT."""
    import importlib.util

    from align_jax.stages import build

    spec = importlib.util.spec_from_file_location("multiprocess_sft_config", os.path.join(ROOT, "configs", "sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    build.load_tokenizer(module.get_config("tiny"), out)
    return os.path.join(out, "tokenizer")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    logs, two = str(base), str(base / "two")
    args = pipeline_args(sft_tokenizer(str(base / "tok")))
    deadline = time.monotonic() + TIMEOUT_S
    jobs = [Job("single", str(base / "single"), args, 1, str(base / "cache1"), logs, ALIGN_JAX_DATA_SHARDS="2")]
    try:
        cut = Job("cut", two, args, 2, str(base / "cache2"), logs)
        jobs.append(cut)
        wait_for_step(os.path.join(two, "sft", "metrics.jsonl"), 2, cut, deadline)
        cut.procs[1].send_signal(signal.SIGTERM)  # one process only: the other must stop too, not hang
        cut.expect([75, 75], deadline)
        with open(os.path.join(two, "sft", "summary.json")) as f, open(os.path.join(two, "summary.json")) as g:
            after_cut = {
                "checkpoints": checkpoint_listing(os.path.join(two, "sft")),
                "sft_summary": json.load(f),
                "pipeline_summary": json.load(g),
                "output": cut.output(),
            }
        resumed = Job("resumed", two, args, 2, str(base / "cache2"), logs)
        jobs.append(resumed)
        resumed.expect([0, 0], time.monotonic() + TIMEOUT_S)
        jobs[0].expect([0], time.monotonic() + TIMEOUT_S)
    finally:
        for job in jobs:
            job.kill()
    return {"single": str(base / "single"), "two": two, "cut": after_cut}


def rows(workdir: str, stage: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in read_metrics(os.path.join(workdir, stage)):
        assert not (set(r) - {"step"}) & set(out.get(r["step"], {})), f"{stage} step {r['step']} logged twice"
        out.setdefault(r["step"], {}).update(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,steps", [("sft", SFT_STEPS), ("dpo", DPO_STEPS), ("grpo", GRPO_STEPS)])
def test_two_processes_train_exactly_what_one_process_trains(runs, stage, steps):
    one, two = rows(runs["single"], stage), rows(runs["two"], stage)
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        a, b = one[step], two[step]
        # The same examples in the same order: the fingerprint covers the whole global batch (each process
        # adds its rows' share), so equality also says the processes' rows together are the global batch.
        assert a["batch_fingerprint"] == b["batch_fingerprint"], f"{stage} step {step}: other data"
        for key in ("loss", "grad_norm", "eval_loss", "eval_reward"):
            if key in a:
                # Only the order of float sums differs (gloo's all-reduce across processes).
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), f"{stage} step {step} {key}"
        for key in ("reward/mean", "response_length", "weight"):  # the same samples, rewarded the same
            if key in a:
                assert b[key] == a[key], f"{stage} step {step} {key}"


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_one_checkpoint_and_resume_continues(runs):
    cut, two = runs["cut"], runs["two"]
    stopped = cut["sft_summary"]["final_step"]
    assert cut["sft_summary"]["preempted"] and 2 <= stopped < SFT_STEPS, cut["output"]
    assert cut["pipeline_summary"]["preempted"] == "sft"
    assert cut["checkpoints"] == [str(stopped)]  # saved once, complete, by both processes together
    assert "another process received SIGTERM" in cut["output"]
    with open(os.path.join(two, "sft", "summary.json")) as f:
        resumed = json.load(f)
    assert resumed["init"] == "resumed" and resumed["start_step"] == stopped and not resumed["preempted"]
    # Both processes restored params, optimizer and their data positions: the steps after the cut saw the
    # single process's batches and losses (test above); here, what is on disk now.
    assert checkpoint_listing(os.path.join(two, "sft")) == sorted([str(stopped), str(SFT_STEPS)])


@pytest.mark.slow
def test_each_checkpoint_and_metric_is_written_once(runs):
    two = runs["two"]
    for stage, final in (("sft", SFT_STEPS), ("dpo", DPO_STEPS), ("grpo", GRPO_STEPS)):
        work = os.path.join(two, stage)
        steps = [n for n in checkpoint_listing(work)]
        assert all(n.isdigit() for n in steps), f"{stage}: partial or duplicate checkpoint dirs {steps}"
        assert str(final) in steps
        for n in steps:
            assert os.path.isfile(os.path.join(work, "checkpoints", n, "_CHECKPOINT_METADATA"))
        # The workdir lock: taken by process 0 only (process 1 did not fail on it), released at exit.
        with open(os.path.join(work, ".lock")) as f:
            assert f.read() == ""
    with open(os.path.join(two, "dpo", "summary.json")) as f:
        summary = json.load(f)
    assert summary["init"] == "init_from_workdir"  # restored from the 2-process SFT checkpoint by both


# -- in-process: which rows each process reads -------------------------------------------------------


CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                  {"role": "assistant", "content": f"{i} plus {i + 3} is {2 * i + 3}." * (1 + i % 4)}]}
    for i in range(48)
]  # fmt: skip


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return str(path)


@pytest.fixture(scope="module")
def chatml():
    from align_jax.data.bpe import train_tokenizer

    return train_tokenizer([m["content"] for c in CHATS for m in c["messages"]], vocab_size=300, template="chatml")


class Reads:
    """Records which source rows an iterator reads, as (epoch, row)."""

    def __init__(self, it):
        self.rows: set[tuple[int, int]] = set()
        source = it._examples.source
        read = source.read

        def recorded(indices):
            self.rows.update((it._epoch, int(i)) for i in indices)
            return read(indices)

        source.read = recorded


def test_each_process_reads_only_its_rows_and_together_they_are_the_global_batch(chat_file, chatml, monkeypatch):
    from align_jax.data.pipeline import ShardedBatches, make_sft_iterator

    cfg = {"train": chat_file, "seq_len": 64, "batch_size": 4, "pack_window": 8}
    monkeypatch.setenv("ALIGN_JAX_DATA_SHARDS", "2")
    one = make_sft_iterator(cfg, chatml, process_index=0, process_count=1)
    assert isinstance(one, ShardedBatches) and one.host_batch == 4
    monkeypatch.delenv("ALIGN_JAX_DATA_SHARDS")
    procs = [make_sft_iterator(cfg, chatml, process_index=p, process_count=2) for p in (0, 1)]
    reads = [Reads(it) for it in procs]
    for step in range(12):  # well into the second epoch
        whole, parts = next(one), [next(it) for it in procs]
        for k in whole:
            assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k]), (step, k)
        if step == 4:
            state = json.loads(json.dumps(one.state()))  # what a checkpoint stores
    assert reads[0].rows and not reads[0].rows & reads[1].rows  # in each epoch, each row by one process
    assert {r for e, r in reads[0].rows | reads[1].rows if e == 0} == set(range(len(CHATS)))
    # The 1-process, 2-shard stream resumes exactly, each shard where it was.
    monkeypatch.setenv("ALIGN_JAX_DATA_SHARDS", "2")
    again, fresh = make_sft_iterator(cfg, chatml, process_count=1), make_sft_iterator(cfg, chatml, process_count=1)
    for _ in range(5):
        next(fresh)
    again.restore(state)
    for _ in range(4):
        a, b = next(again), next(fresh)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="ALIGN_JAX_DATA_SHARDS"):
        make_sft_iterator(cfg, chatml, process_count=1).restore(procs[0].state())
    monkeypatch.setenv("ALIGN_JAX_DATA_SHARDS", "3")
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        make_sft_iterator(cfg, chatml, process_index=0, process_count=2)


def test_rollout_prompts_are_split_between_processes():
    from align_jax.data.prompts import PromptStream
    from align_jax.workdir import resolve_data_path

    spec = resolve_data_path("demo:rl_train")
    whole, parts = PromptStream(spec, 0), [PromptStream(spec, 0) for _ in range(2)]
    for _ in range(3):
        expected = whole.take(8)
        got = [p.take(8, part=(i, 2)) for i, p in enumerate(parts)]
        assert [r for r, _ in got[0] + got[1]] == [r for r, _ in expected]
    assert parts[0].state() == parts[1].state() == whole.state()  # every process keeps the same position
    with pytest.raises(ValueError, match="cannot be split"):
        whole.take(7, part=(0, 2))


def test_grpo_settings_that_cannot_run_on_several_processes_are_refused_before_the_run(monkeypatch):
    import importlib.util

    import jax

    from align_jax.config.sections import ConfigValueError
    from align_jax.stages import grpo

    spec = importlib.util.spec_from_file_location("multiprocess_grpo_config", os.path.join(ROOT, "configs", "grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grpo.check_processes(module.get_config("tiny"))  # one process: anything goes
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = module.get_config("tiny")
    grpo.check_processes(config)  # 16 prompts x 4 samples: 8 prompts per process
    config.rollout_staleness = 1
    with pytest.raises(ConfigValueError, match="rollout_staleness=1: not supported with 2 processes"):
        grpo.check_processes(config)
    config = module.get_config("tiny")
    config.data.batch_size = 12  # 3 prompts
    with pytest.raises(ConfigValueError, match="3 prompts per rollout cannot be shared by 2 processes"):
        grpo.check_processes(config)
