"""Training data: raw rows -> canonical chats or preference pairs -> tokens and loss masks -> packed rows
-> sharded batches.

formats.py   raw rows (messages / ShareGPT / Alpaca / prompt-completion) -> canonical records
sources.py   random-access rows from JSONL / JSON / Parquet files, HF datasets, TFDS
tokenize.py  chat template rendering and the assistant loss mask
packing.py   exact-fill packing (99.6% token utilisation on the demo data) into fixed-shape rows
pipeline.py  the loaders' front door: sft_loader.py (SFT batches), shuffled_batches.py / ordered_batches.py
             (resumable train stream, eval pass), window_packer.py (bad rows, stats), data_config.py,
             multihost.py (global batch assembly)
preference_formats.py  preference rows (HH-RLHF, TRL, UltraFeedback, plain, KTO) -> canonical records
preference.py  those records -> packed pair batches (both members of a pair in one row), resumable loaders
prefetch.py  batches prepared in a background thread, with the consumer's resumable state
prompts.py   GRPO's prompt rows as an endless, resumable stream
bpe.py       small locally trained byte-level BPE tokenizers with real chat templates (demo, tests)
demo/        the bundled demo chats and preference pairs, and the seeded script that writes them
"""

import os

from align_jax.data.bpe import train_tokenizer
from align_jax.data.formats import BadRowError, Origin, detect_format, to_record
from align_jax.data.packing import Packer, PackingStats, pack_window
from align_jax.data.pipeline import EvalBatches, SFTDataConfig, SFTIterator, global_batch, make_sft_iterator
from align_jax.data.preference import (
    PREF_BATCH_FIELDS,
    PreferenceDataConfig,
    ScoreStats,
    compute_score_stats,
    iterate_all,
    make_preference_iterator,
    to_preference_record,
)
from align_jax.data.sources import open_source
from align_jax.data.tokenize import TemplateError, tokenize_chat

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
DEMO_TRAIN = os.path.join(DEMO_DIR, "sft_train.jsonl")
DEMO_EVAL = os.path.join(DEMO_DIR, "sft_eval.jsonl")
DEMO_PREF_TRAIN = os.path.join(DEMO_DIR, "pref_train.jsonl")
DEMO_PREF_EVAL = os.path.join(DEMO_DIR, "pref_eval.jsonl")

__all__ = [
    "DEMO_DIR",
    "DEMO_EVAL",
    "DEMO_PREF_EVAL",
    "DEMO_PREF_TRAIN",
    "DEMO_TRAIN",
    "PREF_BATCH_FIELDS",
    "BadRowError",
    "EvalBatches",
    "Origin",
    "Packer",
    "PackingStats",
    "PreferenceDataConfig",
    "SFTDataConfig",
    "SFTIterator",
    "ScoreStats",
    "TemplateError",
    "compute_score_stats",
    "detect_format",
    "global_batch",
    "iterate_all",
    "make_preference_iterator",
    "make_sft_iterator",
    "open_source",
    "pack_window",
    "to_preference_record",
    "to_record",
    "tokenize_chat",
    "train_tokenizer",
]
