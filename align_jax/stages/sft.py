"""SFT: next-token loss on the assistant turns of packed chat data."""

from __future__ import annotations

import functools
import os

import jax
import ml_collections

from align_jax.config import resolve_data_path, validate
from align_jax.data import pipeline
from align_jax.losses.sft import sft_loss
from align_jax.metrics import flops_per_token
from align_jax.models.transformer import Decoder
from align_jax.stages import build, runner
from align_jax.train.step import make_train_step

BATCH_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")


def data_config(config: ml_collections.ConfigDict) -> dict:
    """config.data as the data pipeline's SFTDataConfig keys (`eval_batches` is the loop's, not its)."""
    d = config.data.to_dict()
    for key in ("eval_batches", "max_pairs", "unpaired"):  # the loop's, and the preference stages'
        d.pop(key)
    d["train"] = resolve_data_path(d["train"])
    d["eval"] = resolve_data_path(d["eval"]) if d["eval"] else None
    return d


class SFTRun(runner.StageRun):
    """Everything an SFT run is made of; `launch/bench.py` builds one too, to time its step."""

    weight_name = "tokens"

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
        self.eval_step = jax.jit(
            lambda params, batch: self.loss_fn(params, batch, jax.random.key(0)),
            in_shardings=(self.setup.param_shardings, self.batch_shardings),
        )

    def flops_per_token(self, avg_context: float) -> float:
        return flops_per_token(self.model_cfg, avg_context)


@runner.locked
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    r = SFTRun(config, workdir)
    return runner.drive(r, lambda ckpt: build.initial_state(r.setup, config, ckpt, workdir))
