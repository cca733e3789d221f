"""SFT: next-token loss on the assistant turns of packed chat data."""

from __future__ import annotations

import functools

import ml_collections

from align_jax.batch import SFT_BATCH
from align_jax.data import pipeline
from align_jax.data.sft_loader import SFTDataConfig
from align_jax.lora import model_apply_fn
from align_jax.losses.sft import sft_loss
from align_jax.metrics import flops_per_token
from align_jax.models.transformer import Decoder
from align_jax.stages import build, runner
from align_jax.stages.spec import Context, StageSpec


def data_config(config: ml_collections.ConfigDict) -> dict:
    """config.data as the SFT data pipeline's config."""
    return build.loader_config(config, SFTDataConfig)


def spec(ctx: Context) -> StageSpec:
    config = ctx.config
    loss = functools.partial(
        sft_loss,
        apply_fn=model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder)),
        z_loss=float(config.train.z_loss),
        loss_chunk=int(config.train.loss_chunk),
    )
    data_cfg = data_config(config)
    return StageSpec(
        batch=SFT_BATCH,
        loss_fn=loss,
        params=build.decoder_params(ctx),
        train_data=pipeline.make_sft_iterator(data_cfg, ctx.tokenizer, split="train"),
        # Built once: it tokenises and packs the eval split on first use and keeps the rows.
        eval_data=pipeline.make_sft_iterator(data_cfg, ctx.tokenizer, split="eval") if data_cfg["eval"] else None,
        flops_per_token=functools.partial(flops_per_token, ctx.model_cfg),
        weight_name="tokens",
    )


run = runner.stage(spec)
