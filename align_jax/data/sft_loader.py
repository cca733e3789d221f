"""The SFT loaders: source rows -> canonical chats -> tokens + loss masks -> packed rows -> host batches.

`SFTDataConfig` is what they read; `make_sft_iterator` builds the train loader (`SFTIterator`, endless,
shuffled, resumable: shuffled_batches.py) or the eval loader (`EvalBatches`, finite, in file order:
ordered_batches.py), both over `_Examples`, which turns a window of row indices into packed chat rows.
A row may give several samples (data.loss_on="per_turn", or "auto" under a template that rewrites earlier
turns: one per assistant turn); the packer packs them like any others.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax

from align_jax.data.data_config import DataConfigMixin
from align_jax.data.formats import FORMATS, BadRowError, Origin, to_record
from align_jax.data.multihost import sharded_stream
from align_jax.data.ordered_batches import OrderedBatches
from align_jax.data.packing import OVER_LONG, Example, Row, empty_rows, pack_window
from align_jax.data.shuffled_batches import ShardedBatches, ShuffledBatches
from align_jax.data.sources import RowSource, open_source
from align_jax.data.tokenize import LOSS_ON, TemplateError, TemplateRejected, chat_examples, end_of_turn_ids
from align_jax.data.window_packer import ON_BAD_ROW, BadRows, Batch, add_packing_stats

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(DataConfigMixin):
    """What the SFT data pipeline reads. `batch_size` is global, in packed rows of `seq_len` tokens."""

    train: Any = None  # a source spec (see sources.open_source): path, glob, list of paths, dataset name, tfds:...
    eval: Any = None
    format: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    loss_on: str = "auto"  # auto | assistant | per_turn | last_assistant | all: see align_jax/data/tokenize.py
    over_long: str = "truncate"
    on_bad_row: str = "error"
    shuffle_seed: int = 0
    pack_window: int = 1000

    def __post_init__(self) -> None:
        self._check(
            {"format": FORMATS, "loss_on": LOSS_ON, "over_long": OVER_LONG, "on_bad_row": ON_BAD_ROW},
            {"seq_len": 2, "batch_size": 1, "pack_window": 1, "shuffle_seed": 0},
        )


class _Examples:
    """Reads rows by index and turns them into tokenised examples, applying the bad-row policy (a
    WindowPacker of SFT chats)."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig):
        self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.bad_rows = BadRows(cfg.on_bad_row)
        self.fallback_logged = False

    def read(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Example]:
        """Examples for `indices`, in order, without the bad rows. `stats=None` replays silently (a
        resumed window whose bad rows were already counted and logged)."""
        out = []
        for raw, origin in self.source.read(indices):
            try:
                out += self._samples(raw, origin)
            except BadRowError as e:
                self.bad_rows.handle(e, stats)
        return out

    def _samples(self, raw: Any, origin: Origin) -> list[Example]:
        """One row's samples; a BadRowError for a bad row (one the chat template refuses included)."""
        if isinstance(raw, BadRowError):
            raise raw
        messages = to_record(raw, self.cfg.format, origin)["messages"]
        try:
            examples, fallback = chat_examples(self.tokenizer, messages, self.cfg.loss_on, self.eot_ids)
        except TemplateRejected as e:
            raise BadRowError(origin, "messages", str(e)) from e
        except TemplateError as e:
            raise TemplateError(f"{origin}: {e}") from e
        if fallback is not None and not self.fallback_logged:
            self.fallback_logged = True
            logger.info(
                "data.loss_on='auto': %s (first at %s); such chats are trained as one sample per assistant turn, "
                "each rendered as the model sees it at inference (loss_on='per_turn'), the others as one sample",
                fallback,
                origin,
            )
        return examples

    def pack(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Row]:
        rows, pstats = pack_window(self.read(indices, stats), self.cfg.seq_len, self.cfg.over_long)
        add_packing_stats(stats, pstats)
        return rows

    def settings(self) -> dict[str, Any]:
        return {"loss_on": self.cfg.loss_on}

    def empty(self, n: int) -> Batch:
        return empty_rows(n, self.cfg.seq_len)


class SFTIterator(ShuffledBatches):
    """The SFT train loader. Yields {tokens, positions, segment_ids, loss_mask}, each int32
    [batch_size / process_count, seq_len]."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig, process_index: int, process_count: int):
        super().__init__(_Examples(source, tokenizer, cfg), cfg, process_index, process_count)


class EvalBatches(OrderedBatches):
    """The SFT eval loader: the whole eval set, in file order, packed once and kept."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: SFTDataConfig, process_index: int, process_count: int):
        super().__init__(_Examples(source, tokenizer, cfg), cfg, process_index, process_count)


def make_sft_iterator(
    data_cfg: Any,
    tokenizer: Any,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
) -> SFTIterator | ShardedBatches | EvalBatches:
    """The loader for `split` ("train": endless `SFTIterator`; "eval": finite `EvalBatches`).

    `data_cfg` is an SFTDataConfig, dict or ConfigDict with the SFTDataConfig keys. Process index and
    count default to jax's; pass them to simulate hosts (tests) or to split differently."""
    cfg = SFTDataConfig.from_any(data_cfg)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    spec = cfg.train if split == "train" else cfg.eval
    if spec is None or spec == "":
        raise ValueError(f"data.{split} is not set: give a file, glob, dataset name or tfds:NAME/SPLIT")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    # A dataset name without a split reads "train" for training; for eval the split must be named.
    source = open_source(spec, split="train" if split == "train" else None)
    if split == "eval":
        return EvalBatches(source, tokenizer, cfg, process_index, process_count)
    # One stream per data shard this process reads (align_jax/data/multihost.py: one, unless
    # ALIGN_JAX_DATA_SHARDS fixes more shards than there are processes).
    return sharded_stream(lambda s, k: SFTIterator(source, tokenizer, cfg, s, k), process_index, process_count)
