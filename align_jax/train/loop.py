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


class _Preemption:
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
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
    progress = Progress(cfg.total_steps, start_step) if cfg.progress else None
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
            if preemption.requested and not is_last:
                if last_saved != step:  # a SIGTERM on a checkpoint step: that save is the one to keep
                    save(step)
                summary["preempted"] = True
                break
    if progress:
        progress.close()
    checkpointer.wait()
    summary.update(final_step=step, last_checkpoint=last_saved, **{f"final_{k}": v for k, v in eval_metrics.items()})
    return state, summary


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

    def rates(self, elapsed: float, flops_fn, peak: float, n_dev: int) -> dict[str, float]:
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


def batch_stats(host_batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Host-side counts of one batch, for throughput and MFU."""
    from align_jax.metrics import mean_causal_context

    seg = host_batch["segment_ids"]
    real = int((seg > 0).sum())
    # Identifies the batch's examples (a resumed run must see the same ones in the same order).
    tokens = host_batch["tokens"].astype(np.int64)
    weights = np.arange(1, tokens.size + 1, dtype=np.int64).reshape(tokens.shape) % 65521
    fingerprint = int((tokens * weights).sum() % 2147483647)
    return {
        "real_tokens": real,
        "token_slots": int(seg.size),
        "avg_context": mean_causal_context(seg),
        "fingerprint": fingerprint,
    }
