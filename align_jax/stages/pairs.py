"""What the preference stages (rm, dpo) share: the packed-pair data of config.data."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from align_jax.data import preference
from align_jax.stages import build
from align_jax.stages.spec import Context

log = logging.getLogger(__name__)


def data_config(config: ml_collections.ConfigDict) -> dict:
    """config.data as the preference pipeline's config."""
    return build.loader_config(config, preference.PreferenceDataConfig)


@dataclasses.dataclass
class PairData:
    """Train and eval loaders of packed preference pairs; the eval split is z-normalised with the train
    split's score statistics."""

    cfg: dict
    train: Any
    eval: Any
    score_stats: dict

    def summary(self) -> dict:
        return {"score_stats": self.score_stats, "devices": jax.device_count()}


def pair_data(ctx: Context) -> PairData:
    if not ctx.config.init_from:
        # Allowed (benchmarks, tests), but a preference stage normally refines an SFT model.
        log.warning("stage %s without init_from: the model starts from random weights", ctx.config.stage)
    cfg = data_config(ctx.config)
    train = preference.make_preference_iterator(cfg, ctx.tokenizer, split="train")
    stats = train.score_stats()
    evals = (
        preference.make_preference_iterator(cfg, ctx.tokenizer, split="eval", score_stats=stats)
        if cfg["eval"]
        else None
    )
    return PairData(cfg, train, evals, stats)
