"""SFT: next-token loss on the assistant turns of packed chat data."""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from align_jax import checkpoint
from align_jax.config import resolve_data_path, validate
from align_jax.data import pipeline
from align_jax.data.prefetch import Prefetcher
from align_jax.losses.sft import sft_loss
from align_jax.metrics import MetricsWriter, flops_per_token
from align_jax.models.transformer import Decoder
from align_jax.stages import build
from align_jax.train import loop
from align_jax.train.step import finalize_metrics, make_train_step

log = logging.getLogger(__name__)

BATCH_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def data_config(config: ml_collections.ConfigDict) -> dict:
    """config.data as the data pipeline's SFTDataConfig keys (`eval_batches` is the loop's, not its)."""
    d = config.data.to_dict()
    d.pop("eval_batches")
    d["train"] = resolve_data_path(d["train"])
    d["eval"] = resolve_data_path(d["eval"]) if d["eval"] else None
    return d


class SFTRun:
    """Everything an SFT run is made of; `launch/bench.py` builds one too, to time its step."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate(config)
        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.tokenizer = build.load_tokenizer(config, workdir)
        sharder = build.make_sharder(config)
        self.model_cfg = build.model_config(config, self.tokenizer)
        self.setup = build.setup_state(self.model_cfg, sharder, config)
        self.model = Decoder(self.model_cfg, sharder)
        self.loss_fn = functools.partial(
            sft_loss, model=self.model, z_loss=float(config.train.z_loss), loss_chunk=int(config.train.loss_chunk)
        )
        self.batch_shardings = self.setup.batch_shardings(BATCH_FIELDS)
        self.step_fn = make_train_step(
            self.loss_fn,
            self.setup.optimizer,
            microbatches=int(config.train.microbatches),
            state_shardings=self.setup.state_shardings,
            batch_shardings=self.batch_shardings,
        )
        self.data_cfg = data_config(config)
        self.train_iter = pipeline.make_sft_iterator(self.data_cfg, self.tokenizer, split="train")
        # Built once: it tokenises and packs the eval split on first use and keeps the rows.
        self.eval_batches = (
            pipeline.make_sft_iterator(self.data_cfg, self.tokenizer, split="eval") if self.data_cfg["eval"] else None
        )
        self._eval_step = jax.jit(
            lambda params, batch: self.loss_fn(params, batch, jax.random.key(0)),
            in_shardings=(self.setup.param_shardings, self.batch_shardings),
        )

    def start_feed(self) -> None:
        """Starts preparing batches in the background (after any restore of the iterator)."""
        self.feed = Prefetcher(self.train_iter)

    def next_batch(self) -> tuple[dict[str, jax.Array], dict]:
        host = next(self.feed)
        return pipeline.global_batch(host, self.batch_shardings["tokens"]), loop.batch_stats(host)

    def evaluate(self, params: Any) -> dict[str, float]:
        """Loss over the eval split (or `data.eval_batches` batches of it), summed then divided once."""
        if self.eval_batches is None:
            return {}
        limit = int(self.config.data.eval_batches) or None
        loss_sum, weight, sums = 0.0, 0.0, {}
        for i, host in enumerate(self.eval_batches):
            if limit is not None and i >= limit:
                break
            ls, w, metrics = jax.device_get(
                self._eval_step(params, pipeline.global_batch(host, self.batch_shardings["tokens"]))
            )
            loss_sum, weight = loss_sum + float(ls), weight + float(w)
            for k, (s, c) in metrics.items():
                a, b = sums.get(k, (0.0, 0.0))
                sums[k] = (a + float(s), b + float(c))
        out = {"eval_loss": loss_sum / max(weight, 1e-9), "eval_tokens": weight}
        out.update({f"eval_{k}": float(v) for k, v in finalize_metrics(sums).items()})
        return out

    def flops_per_token(self, avg_context: float) -> float:
        return flops_per_token(self.model_cfg, avg_context)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    r = SFTRun(config, workdir)
    tc = config.train
    checkpointer = checkpoint.Checkpointer(
        workdir, keep=int(tc.keep), best_metric=tc.best_metric or None, async_save=bool(tc.async_checkpoint)
    )
    state, data_state, how = build.initial_state(r.setup, config, checkpointer, workdir)
    if data_state:
        r.train_iter.restore(pipeline.host_state(data_state))
    r.start_feed()
    start = int(jax.device_get(state.step))
    log.info("sft: %s; %.1fM params; starting at step %d", how, r.model_cfg.num_params() / 1e6, start)
    writer = MetricsWriter(
        workdir, tensorboard=bool(config.metrics.tensorboard), wandb_project=config.metrics.wandb_project or None
    )
    writer.truncate_after(start)
    hooks = loop.LoopHooks(
        step_fn=r.step_fn,
        next_batch=r.next_batch,
        data_state=lambda: pipeline.gather_host_states(r.feed.state()),
        evaluate=r.evaluate if r.eval_batches is not None else None,
        flops_per_token=r.flops_per_token,
        config_json=build.saved_config(config, r.model_cfg),
        learning_rate=r.setup.schedule,
        extra_metrics=lambda: {f"data/{k}": v for k, v in r.train_iter.stats().items() if isinstance(v, (int, float))},
    )
    loop_cfg = loop.LoopConfig(
        total_steps=int(tc.steps),
        log_every=int(tc.log_every),
        eval_every=int(tc.eval_every),
        ckpt_every=int(tc.ckpt_every),
        progress=bool(tc.progress),
        peak_flops=float(tc.peak_flops),
    )
    try:
        state, summary = loop.run(
            state, start_step=start, cfg=loop_cfg, hooks=hooks, checkpointer=checkpointer, writer=writer
        )
    finally:
        r.feed.close()
        checkpointer.close()
        writer.close()
    summary.update(init=how, n_params=r.model_cfg.num_params(), data=r.train_iter.stats())
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=_json_default)
    return summary


def _json_default(x):
    if isinstance(x, (np.generic, jnp.ndarray)):
        return np.asarray(x).tolist()
    return str(x)
