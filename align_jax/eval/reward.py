"""Scoring (prompt, response) pairs with a trained reward model, from Python or `launch/score.py`.

    scorer = RewardScorer.load("runs/rm-demo")
    scorer.score(["What is 2 plus 2?"], ["2 plus 2 is 4."])          # -> np.array([reward])
    scorer.accuracy(prompts, chosen, rejected)                        # share of pairs ranked right

A response is tokenised exactly as in RM training (the tokenizer's chat template, prompt + response,
via `tokenize_chat`), and its reward is the head's value at its last target token. Sequences are
scored one per row, right-padded to a power-of-two length bucket in fixed-size batches, so a run
compiles once per bucket. The params live on the scorer's mesh (`sharder`; by default every local
device on fsdp, as for `align_jax.chat.ChatModel`), restored straight into their shardings, and each
batch is split over the mesh's batch axes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from align_jax import checkpoint
from align_jax.data.tokenize import end_of_turn_ids, tokenize_chat
from align_jax.losses.pairs import last_target_index, values_at
from align_jax.models.heads import ScalarModel
from align_jax.sharding import Sharder, tree_shardings

Prompt = str | Sequence[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class RewardScorer:
    def __init__(self, model: ScalarModel, params: Any, tokenizer: Any, batch_size: int = 8, max_len: int = 4096):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size, self.max_len = batch_size, max_len
        self.eot_ids = end_of_turn_ids(tokenizer)
        self._forward = jax.jit(self._rewards)

    @classmethod
    def load(
        cls,
        workdir: str,
        step: int | None = None,
        batch_size: int = 8,
        dtype: str = "float32",
        *,
        sharder: Sharder | None = None,
    ) -> RewardScorer:
        """An RM stage's workdir: its saved config and tokenizer, and the params of `step` (latest), in their
        shardings on `sharder`'s mesh (default: `align_jax.chat.default_sharder()`)."""
        from transformers import AutoTokenizer

        from align_jax.chat import default_sharder

        saved = checkpoint.read_config(workdir, step)
        stage = saved.get("config", {}).get("stage")
        if stage != "rm":
            raise ValueError(f"{workdir}: a checkpoint of stage {stage!r}, not a reward model (stage 'rm')")
        cfg = checkpoint.model_config_of(workdir, param_dtype=dtype, dtype=dtype, remat_policy="none")
        sharder = sharder or default_sharder()
        model = ScalarModel(cfg, sharder)
        tokens = jnp.zeros((1, 8), jnp.int32)
        boxed = jax.eval_shape(
            lambda r: model.init(r, tokens, jnp.broadcast_to(jnp.arange(8), (1, 8)), jnp.ones_like(tokens))["params"],
            jax.random.key(0),
        )
        abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), tree_shardings(boxed, sharder))
        # The sharder too: a LoRA RM over an HF base then reads that base in slices, not whole on one device.
        params = checkpoint.restore_params(workdir, abstract, step, sharder=sharder)
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
        max_len = int(saved["config"].get("data", {}).get("seq_len", 4096))
        return cls(model, params, tokenizer, batch_size=batch_size, max_len=max_len)

    def _rewards(self, params, batch):
        values = self.model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
        # One sequence per row: its segment 1, the first of a "pair" whose second member is absent.
        return values_at(values, last_target_index({**batch, "pair_mask": jnp.zeros((values.shape[0], 1))}))[:, 0]

    def _on_mesh(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Host [B, T] arrays split over the mesh's batch axes (replicated where they do not divide B)."""
        sharder = self.model.sharder
        if sharder.mesh is None:
            return batch
        return {k: jax.device_put(v, sharder.sharding(("activation_batch", None), v.shape)) for k, v in batch.items()}

    def encode(self, prompt: Prompt, response: str) -> tuple[np.ndarray, np.ndarray]:
        messages = [*as_messages(prompt), {"role": "assistant", "content": response}]
        ids, mask = tokenize_chat(self.tokenizer, messages, "last_assistant", self.eot_ids)
        if len(ids) > self.max_len:  # keep the end: the reward is read at the response's last token
            ids, mask = ids[-self.max_len :], mask[-self.max_len :]
        return ids, mask

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Rewards [N] float32 of each (prompt, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        out = np.zeros(len(encoded), np.float32)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            longest = max(len(encoded[i][0]) for i in idx)
            t = max(32, 1 << (longest - 1).bit_length())
            batch = {
                k: np.zeros((self.batch_size, t), np.int32) for k in ("tokens", "positions", "segment_ids", "loss_mask")
            }
            for row, i in enumerate(idx):
                ids, mask = encoded[i]
                n = len(ids)
                batch["tokens"][row, :n] = ids
                batch["positions"][row, :n] = np.arange(n)
                batch["segment_ids"][row, :n] = 1
                batch["loss_mask"][row, :n] = mask
            rewards = np.asarray(self._forward(self.params, self._on_mesh(batch)))
            out[idx] = rewards[: len(idx)]
        return out

    def accuracy(self, prompts: Sequence[Prompt], chosen: Sequence[str], rejected: Sequence[str]) -> float:
        """Share of pairs whose chosen response gets the higher reward."""
        rc, rr = self.score(prompts, chosen), self.score(prompts, rejected)
        return float(np.mean(rc > rr)) if len(rc) else float("nan")
