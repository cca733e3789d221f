"""The training loop every stage shares: step, log, evaluate, checkpoint, and stop well.

- Steps are dispatched asynchronously; the host reads a step's metrics one step late (while the next
  runs), so checking for NaN costs no pipeline stall.
- A non-finite loss or gradient stops the run with a message naming the step and the last good
  checkpoint; the step itself left params unchanged, and nothing is saved over good checkpoints.
- SIGTERM (preemption) finishes the step in flight, saves a checkpoint, and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from align_jax.checkpoint import Checkpointer
from align_jax.metrics import MetricsWriter, Progress, device_peak_flops

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or Inf."""


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 0  # 0: only at the end
    best_metric: str | None = None
    progress: bool = True
    peak_flops: float = 0.0  # per device; 0 -> looked up from the device kind


@dataclasses.dataclass
class LoopHooks:
    """What the loop needs from its stage."""

    step_fn: Callable[[Any, dict], tuple[Any, dict]]
    next_batch: Callable[[Any], tuple[dict, dict]]  # train state -> (global batch, host-side stats of it)
    data_state: Callable[[], dict]
    evaluate: Callable[[Any], dict[str, float]] | None = None  # train state -> eval metrics
    flops_per_token: Callable[[float], float] | None = None  # avg causal context -> training FLOPs/token
    config_json: dict = dataclasses.field(default_factory=dict)
    learning_rate: Callable[[int], float] | None = None  # the schedule, to log the rate of each step
    extra_metrics: Callable[[], dict[str, float]] | None = None  # e.g. packing efficiency so far


# A SIGTERM that came before the loop started (catch_sigterm_early), for the next loop to act on.
_early = {"requested": False}


def catch_sigterm_early() -> None:
    """For launch scripts of multi-process runs, right after `jax.distributed.initialize()`: from then on a
    SIGTERM is kept until the training loop starts, which then stops all processes after its first step,
    with a checkpoint. (Without it, a SIGTERM during startup goes to JAX's preemption notifier, which
    only records it: the process would train on as if nothing had come.)"""

    def handler(signum, frame):
        log.warning("SIGTERM received before training started: stopping after the first step")
        _early["requested"] = True

    signal.signal(signal.SIGTERM, handler)


class _Preemption:
    """SIGTERM while the loop runs (or before it: catch_sigterm_early): `requested` on this process.
    `agreed()` after each step says whether to stop after it, the same answer on every process (a save and
    every later step are collective: a process that stopped alone would leave the others waiting forever)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._vote = _StopVote() if jax.process_count() > 1 else None

    def agreed(self) -> bool:
        """One process: whether SIGTERM came. Several: whether any process had it when the previous step's
        vote was cast, known one step late (read while this step runs, so it never stalls the pipeline);
        every process gets the same answer at the same step."""
        if self._vote is None:
            return self.requested
        stop = self._vote.cast(self.requested)
        if stop and not self.requested:
            log.warning("another process received SIGTERM: saving a checkpoint after the current step")
        return stop

    def __enter__(self):
        self.requested, _early["requested"] = _early["requested"], False

        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint after the current step")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _StopVote:
    """A tiny all-reduce (max of a flag over every device) per step, read one step late."""

    def __init__(self):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.asarray(jax.devices()), ("all",))
        self._sharding = NamedSharding(mesh, PartitionSpec("all"))
        self._max = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self._pending: jax.Array | None = None

    def cast(self, flag: bool) -> bool:
        # One element per device, each process's devices holding its flag, wherever they sit in the mesh.
        shards = [jax.device_put(np.full((1,), int(flag), np.int32), d) for d in jax.local_devices()]
        votes = jax.make_array_from_single_device_arrays((jax.device_count(),), self._sharding, shards)
        vote = self._max(votes)
        previous, self._pending = self._pending, vote
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))


def run(
    state: Any,
    *,
    start_step: int,
    cfg: LoopConfig,
    hooks: LoopHooks,
    checkpointer: Checkpointer,
    writer: MetricsWriter,
) -> tuple[Any, dict]:
    """Runs steps start_step..total_steps. Returns (state, summary)."""
    peak = cfg.peak_flops or device_peak_flops(jax.devices()[0])
    n_dev = jax.device_count()
    # One progress bar per run, not one per process.
    progress = Progress(cfg.total_steps, start_step) if cfg.progress and jax.process_index() == 0 else None
    summary: dict[str, Any] = {"start_step": start_step, "preempted": False}
    last_saved = checkpointer.latest_step()
    window = _Window()
    pending: tuple[int, dict] | None = None  # (step number, device metrics) not yet read
    eval_metrics: dict[str, float] = {}
    step = start_step

    def save(at: int, metrics: dict | None = None):
        nonlocal last_saved, pending
        if pending is not None:  # never save a step before knowing it was finite
            check(*pending)
            pending = None
        checkpointer.save(at, state, hooks.data_state(), hooks.config_json, metrics=metrics)
        last_saved = at

    def check(step_no: int, metrics: dict) -> dict:
        host = jax.device_get(metrics)
        if not int(host["finite"]):
            where = f"{checkpointer.directory}/{last_saved}" if last_saved is not None else "none saved yet"
            raise NonFiniteError(
                f"step {step_no}: loss={float(host['loss'])} grad_norm={float(host['grad_norm'])} is not finite; "
                f"the update was skipped and the run stopped. Last good checkpoint: {where}"
            )
        return host

    with _Preemption() as preemption:
        t_window = time.perf_counter()
        while step < cfg.total_steps:
            batch, batch_stats = hooks.next_batch(state)
            state, metrics = hooks.step_fn(state, batch)
            step += 1
            window.add(batch_stats)
            if pending is not None:
                check(*pending)
            pending = (step, metrics)

            is_last = step == cfg.total_steps
            if step % cfg.log_every == 0 or is_last:
                host = check(*pending)
                pending = None
                elapsed = time.perf_counter() - t_window
                row = {k: float(np.asarray(v)) for k, v in host.items() if k != "finite"}
                if hooks.learning_rate is not None:
                    row["learning_rate"] = float(hooks.learning_rate(step - 1))  # the rate step `step` used
                row.update(window.rates(elapsed, hooks.flops_per_token, peak, n_dev))
                if hooks.extra_metrics is not None:
                    row.update(hooks.extra_metrics())
                writer.write(step, row)
                if progress:
                    progress.update(step, f"loss {row['loss']:.4f}")
                window = _Window()
                t_window = time.perf_counter()

            do_eval = hooks.evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or is_last)
            if do_eval:
                eval_metrics = hooks.evaluate(state)
                writer.write(step, eval_metrics)
                t_window = time.perf_counter()  # eval time is not step time
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or is_last:
                save(step, eval_metrics if do_eval else None)
            if preemption.agreed() and not is_last:
                if last_saved != step:  # a SIGTERM on a checkpoint step: that save is the one to keep
                    save(step)
                summary["preempted"] = True
                break
    if progress:
        progress.close()
    checkpointer.wait()
    summary.update(final_step=step, last_checkpoint=last_saved, **{f"final_{k}": v for k, v in eval_metrics.items()})
    return state, summary


_FINGERPRINT_MOD = 2147483647


class _Window:
    """Token counts since the last log line."""

    def __init__(self):
        self.steps = 0
        self.real_tokens = 0
        self.slots = 0
        self.context_sum = 0.0
        self.fingerprint = 0

    def add(self, stats: dict) -> None:
        self.steps += 1
        self.fingerprint = stats.get("fingerprint", 0)
        self.real_tokens += int(stats.get("real_tokens", 0))
        self.slots += int(stats.get("token_slots", 0))
        self.context_sum += float(stats.get("avg_context", 0.0)) * int(stats.get("real_tokens", 0))

    def _sum_over_processes(self) -> None:
        from align_jax.data.multihost import all_rows

        # Counts as int32 (JAX moves no 64-bit values by default; each is below 2**31), the context as float32.
        counts = all_rows(np.asarray([[self.real_tokens, self.slots, self.fingerprint]], np.int32)).astype(np.int64)
        self.real_tokens, self.slots = int(counts[:, 0].sum()), int(counts[:, 1].sum())
        self.fingerprint = int(counts[:, 2].sum() % _FINGERPRINT_MOD)
        self.context_sum = float(all_rows(np.asarray([self.context_sum], np.float32)).sum())

    def rates(self, elapsed: float, flops_fn, peak: float, n_dev: int) -> dict[str, float]:
        if jax.process_count() > 1:  # each process counted its own rows: the global batch is their sum
            self._sum_over_processes()
        out = {"step_s": elapsed / max(self.steps, 1), "batch_fingerprint": float(self.fingerprint)}
        if elapsed <= 0 or not self.slots:
            return out
        out["tokens_per_s"] = self.real_tokens / elapsed
        out["slots_per_s"] = self.slots / elapsed
        out["batch_packing_efficiency"] = self.real_tokens / self.slots
        if flops_fn is not None and self.real_tokens:
            flops = flops_fn(self.context_sum / self.real_tokens) * self.real_tokens / elapsed
            out["tflops_per_s"] = flops / 1e12
            out["mfu"] = flops / (peak * n_dev) if peak else 0.0
        return out


def batch_stats(host_batch: dict[str, np.ndarray], first_row: int | None = None) -> dict[str, float]:
    """Host-side counts of this process's rows of one batch (rows `first_row`.. of the global batch; by
    default this process's share), for throughput and MFU."""
    from align_jax.metrics import mean_causal_context

    seg = host_batch["segment_ids"]
    real = int((seg > 0).sum())
    # Identifies the batch's examples (a resumed run must see the same ones in the same order). Weighted
    # by position in the global batch: the processes' sums add up to the fingerprint of the whole batch,
    # the same as a single process reading all of it computes.
    tokens = host_batch["tokens"].astype(np.int64)
    if first_row is None:
        first_row = jax.process_index() * tokens.shape[0]
    start = first_row * int(np.prod(tokens.shape[1:], dtype=np.int64))
    weights = np.arange(start + 1, start + tokens.size + 1, dtype=np.int64).reshape(tokens.shape) % 65521
    fingerprint = int((tokens * weights).sum() % _FINGERPRINT_MOD)
    return {
        "real_tokens": real,
        "token_slots": int(seg.size),
        "avg_context": mean_causal_context(seg),
        "fingerprint": fingerprint,
    }
