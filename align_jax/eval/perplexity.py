"""Held-out perplexity of a causal LM on SFT-format chats, through the SFT data pipeline.

    perplexity(cfg, params, tokenizer, "demo:sft_eval", seq_len=256, batch_size=16)
    # -> {"nll": 0.52, "ppl": 1.68, "tokens": 6687.0, "accuracy": 0.83}

The chats are read, tokenised with the chat template, masked (assistant turns by default) and packed
exactly as the SFT stage's eval split is (`make_sft_iterator(..., split="eval")`), and the loss is the
SFT loss, so `nll` here equals an SFT run's `eval_loss` on the same file and settings. Packing does not
change the numbers: attention stays inside each packed sequence. The mean is token-weighted: summed
NLL over all target tokens of all batches, divided once by their count.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np

from align_jax.data import pipeline
from align_jax.losses.sft import sft_loss
from align_jax.models.apply import apply_fn
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import Decoder
from align_jax.sharding import Sharder, batch_sharding, make_mesh, normalize_rules
from align_jax.workdir import resolve_data_path


def _data_parallel_size(sharding: jax.sharding.NamedSharding) -> int:
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(sharding.mesh.shape[a] for a in axes)


@functools.lru_cache(maxsize=8)
def _loss_step(model_cfg: ModelConfig, sharder: Sharder, loss_chunk: int):
    # Cached: a pipeline evaluates every stage's checkpoint of one model shape, and each would
    # otherwise compile the same step again.
    loss = functools.partial(sft_loss, apply_fn=apply_fn(Decoder(model_cfg, sharder)), loss_chunk=loss_chunk)
    return jax.jit(lambda p, b: loss(p, b, None))


def perplexity(
    model_cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    path: str,
    *,
    seq_len: int,
    batch_size: int,
    format: str = "auto",
    limit_batches: int | None = None,
    sharder: Sharder | None = None,
    loss_on: str = "auto",
    loss_chunk: int = 0,
) -> dict[str, float]:
    """Token-weighted mean NLL of the `loss_on` tokens of the chats in `path` (a file, glob, `demo:NAME`
    or anything `data.eval` takes), its exp (`ppl`), the target token count and the greedy next-token
    accuracy. `limit_batches` stops after that many batches. `batch_size` (packed rows of `seq_len`)
    is rounded up to a multiple of the data-parallel size; the extra rows are empty and change nothing.
    `loss_chunk` > 0 computes the LM head in chunks (large vocabularies; same numbers)."""
    sharder = sharder or Sharder(make_mesh({"data": -1}), normalize_rules(None))
    sharding = batch_sharding(sharder)
    dp = _data_parallel_size(sharding)
    data_cfg = pipeline.SFTDataConfig(
        eval=resolve_data_path(path),
        format=format,
        seq_len=seq_len,
        batch_size=-(-batch_size // dp) * dp,
        loss_on=loss_on,
    )
    batches = pipeline.make_sft_iterator(data_cfg, tokenizer, split="eval")
    step = _loss_step(model_cfg, sharder, loss_chunk)
    nll_sum, tokens, correct = 0.0, 0.0, 0.0
    for i, host in enumerate(batches):
        if limit_batches is not None and i >= limit_batches:
            break
        loss_sum, n, metrics = jax.device_get(step(params, pipeline.global_batch(host, sharding)))
        # Summed in float64 on the host: batch sums are exact enough, a long float32 running sum is not.
        nll_sum, tokens = nll_sum + float(np.float64(loss_sum)), tokens + float(n)
        correct += float(metrics["accuracy"][0])
    if tokens == 0:
        raise ValueError(f"{path}: no target tokens to score (loss_on={loss_on!r}; empty file or every row dropped?)")
    nll = nll_sum / tokens
    return {"nll": nll, "ppl": math.exp(nll), "tokens": tokens, "accuracy": correct / tokens}
