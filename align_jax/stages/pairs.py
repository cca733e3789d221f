"""What the preference stages (rm, dpo) share: the packed-pair data of config.data."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections

from align_jax.data import preference
from align_jax.stages.spec import Context
from align_jax.workdir import resolve_data_path

log = logging.getLogger(__name__)

# config.data keys the preference pipeline reads (the rest are the loop's or SFT's).
DATA_KEYS = ("train", "eval", "format", "seq_len", "batch_size", "max_pairs", "unpaired", "over_long",
             "on_bad_row", "shuffle_seed", "pack_window")  # fmt: skip


def data_config(config: ml_collections.ConfigDict) -> dict:
    d = {k: config.data[k] for k in DATA_KEYS}
    d["train"] = resolve_data_path(d["train"])
    d["eval"] = resolve_data_path(d["eval"]) if d["eval"] else None
    return d


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
