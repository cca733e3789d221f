"""What the preference stages (rm, dpo) share: the tokenizer, mesh, model config and packed-pair data."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from align_jax.config import resolve_data_path, validate
from align_jax.data import preference
from align_jax.stages import build, runner

log = logging.getLogger(__name__)

# config.data keys the preference loader does not read (SFT's, or the loop's).
_NOT_PREFERENCE = ("loss_on", "eval_batches")


def data_config(config: ml_collections.ConfigDict) -> dict:
    d = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_PREFERENCE}
    d["train"] = resolve_data_path(d["train"])
    d["eval"] = resolve_data_path(d["eval"]) if d["eval"] else None
    return d


class PairRun(runner.StageRun):
    """Tokenizer, sharder, model config and the train/eval loaders of packed preference pairs."""

    weight_name = "pairs"

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate(config)
        if not config.init_from:
            # Allowed (benchmarks, tests), but a preference stage normally refines an SFT model.
            log.warning("stage %s without init_from: the model starts from random weights", config.stage)
        self.config, self.workdir = config, workdir
        os.makedirs(workdir, exist_ok=True)
        self.tokenizer = build.load_tokenizer(config, workdir)
        self.sharder = build.make_sharder(config)
        self.model_cfg = build.model_config(config, self.tokenizer)
        self.data_cfg = data_config(config)
        self.train_iter = preference.make_preference_iterator(self.data_cfg, self.tokenizer, split="train")
        self.score_stats = self.train_iter.score_stats()
        self.eval_batches = (
            preference.make_preference_iterator(
                self.data_cfg, self.tokenizer, split="eval", score_stats=self.score_stats
            )
            if self.data_cfg["eval"]
            else None
        )

    def fields(self) -> tuple[str, ...]:
        return tuple(preference.PREF_BATCH_FIELDS)

    def shard_batches(self) -> dict:
        return self.setup.batch_shardings(self.fields())

    def summary_extra(self) -> dict:
        return {"score_stats": self.score_stats, "devices": jax.device_count()}
