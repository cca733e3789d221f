"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, W&B when asked; plus a progress
line with ETA and the FLOP accounting behind MFU.

MFU accounting (per real, non-pad token, forward + backward = 3x forward):
    6 * N_matmul  +  6 * L * H_q * d_head * S_avg   (causal attention: half of the T^2 score and
                                                    value matmuls, over the token's own segment)
where N_matmul counts every weight that multiplies activations, the LM head included and the
embedding lookup excluded (a gather, not a matmul).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

from align_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per device, for MFU. CPU has no meaningful peak: MFU is reported as 0 there
# unless `peak_flops` is given in the config.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def device_peak_flops(device) -> float:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return 0.0


def flops_per_token(cfg: ModelConfig, avg_context: float, backward: bool = True) -> float:
    """Training FLOPs per real token (see the module docstring). `avg_context` is the mean number of
    keys a query attends to (about half its segment length under causal masking)."""
    n_matmul = cfg.num_params(include_embedding=False, active=True)
    if cfg.tie_word_embeddings:
        n_matmul += cfg.vocab_size * cfg.hidden_size  # the head still multiplies by the shared table
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_size * avg_context  # QK^T and PV, forward
    fwd = 2 * n_matmul + attn
    return 3 * fwd if backward else fwd


def mean_causal_context(segment_ids: np.ndarray) -> float:
    """Mean over real tokens of the number of keys each attends to ((n+1)/2 per segment of n)."""
    total, count = 0.0, 0
    for row in np.asarray(segment_ids):
        _, lengths = np.unique(row[row > 0], return_counts=True)
        total += float(np.sum(lengths * (lengths + 1) / 2))
        count += int(np.sum(lengths))
    return total / max(count, 1)


class MetricsWriter:
    """One JSON object per logged step in metrics.jsonl, the same scalars in TensorBoard event files,
    and in W&B when installed and asked for. Only process 0 writes."""

    def __init__(
        self, workdir: str, *, tensorboard: bool = True, wandb_project: str | None = None, config: dict | None = None
    ):
        import jax

        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=config, dir=workdir, resume="allow")
            except ImportError:
                log.warning("wandb is not installed; metrics go to metrics.jsonl and TensorBoard only")

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`: after a resume those steps run again, and the file should hold one
        history, not the killed run's tail followed by its replay. A line a kill cut short (or any other
        line that is not a JSON object) is dropped with a warning: metrics never block a resume."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        rows = [row for row in read_metrics_file(self.path, warn=True) if row.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_float(v) for k, v in scalars.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _to_float(v: Any) -> float | None:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return None
    return f


def _tensorboard_writer(logdir: str):
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


def read_metrics_file(path: str, *, warn: bool = False) -> list[dict]:
    """The rows of a metrics.jsonl, skipping lines that are not whole JSON objects: the last line of a
    run killed mid-write is torn, and a reader (a resume, the report) must not fail on it."""
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(line_no)
    if bad and warn:
        log.warning(
            "%s: dropping %d line(s) that are not whole JSON rows (line %s; a run killed mid-write)",
            path,
            len(bad),
            ", ".join(map(str, bad[:5])),
        )
    return rows


def read_metrics(workdir: str) -> list[dict]:
    return read_metrics_file(os.path.join(workdir, "metrics.jsonl"))


class Progress:
    """A one-line progress bar with rate and ETA, redrawn in place on a terminal, logged otherwise."""

    def __init__(self, total: int, start: int = 0, stream=None):
        stream = stream if stream is not None else sys.stderr  # looked up now: it may be redirected since import
        self.total, self.start_step, self.stream = total, start, stream
        self.t0 = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, text: str = "") -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = f"[{bar}] {step}/{self.total} {rate:.2f} it/s ETA {_fmt_time(eta)} {text}"
        if self.tty:
            self.stream.write("\r" + line[:200])
            self.stream.flush()
        else:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
