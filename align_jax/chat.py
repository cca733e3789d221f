"""A causal LM with its tokenizer, text in and text out: what evaluation, the PAS teacher and judge, and
prompt augmentation need from a model.

    model = ChatModel.load("runs/sft-demo")            # a stage workdir, or an HF directory
    model.generate(["What is 2 plus 2?"], max_new_tokens=32)                  # -> ["2 plus 2 is 4."]
    model.generate([[{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]])
    model.embed(["some text", ...])                     # [N, E] mean-pooled final hidden states

Prompts are rendered with the tokenizer's chat template (generation prompt on) and sampled with
`align_jax.generate` in fixed-size batches whose prompt width is a power-of-two bucket, so a long list
of prompts compiles once per bucket, not once per call. A row stops at the template's end-of-turn token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from align_jax import checkpoint
from align_jax.data.tokenize import end_of_turn_ids
from align_jax.generate import generate
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import _forward
from align_jax.sharding import Sharder, make_mesh, normalize_rules

Prompt = str | Sequence[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def default_sharder() -> Sharder:
    """Data-parallel over every local device: inference batches split, params replicated."""
    return Sharder(make_mesh({"data": -1}, devices=jax.local_devices()), normalize_rules(None))


def load_model_params(source: str, *, dtype: str = "float32", step: int | None = None, sharder: Sharder | None = None):
    """(ModelConfig, params, tokenizer dir) of a causal LM in an HF directory or a stage workdir."""
    from align_jax.models.hf import abstract_params, load_pretrained
    from align_jax.workdir import TOKENIZER_DIR

    sharder = sharder or default_sharder()
    if checkpoint.is_hf_dir(source):
        cfg, params = load_pretrained(source, dtype=dtype, compute_dtype=dtype, sharder=sharder)
        return cfg, params, source
    cfg = checkpoint.model_config_of(source, param_dtype=dtype, dtype=dtype, remat_policy="none")
    boxed = abstract_params(cfg, sharder)
    from align_jax.sharding import tree_shardings

    abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), tree_shardings(boxed, sharder))
    params = checkpoint.restore_decoder_params(source, abstract, step)
    return cfg, params, os.path.join(source, TOKENIZER_DIR)


class ChatModel:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Any,
        tokenizer: Any,
        *,
        sharder: Sharder | None = None,
        batch_size: int = 16,
        max_prompt_len: int = 512,
        name: str = "",
    ):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.sharder = sharder or default_sharder()
        self.batch_size, self.max_prompt_len, self.name = batch_size, max_prompt_len, name
        self.eot_ids = sorted(end_of_turn_ids(tokenizer))

    @classmethod
    def load(cls, source: str, *, step: int | None = None, dtype: str = "float32", **kwargs: Any) -> ChatModel:
        from transformers import AutoTokenizer

        sharder = kwargs.pop("sharder", None) or default_sharder()
        cfg, params, tok_dir = load_model_params(source, dtype=dtype, step=step, sharder=sharder)
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{source}: no tokenizer at {tok_dir}")
        kwargs.setdefault("name", os.path.basename(os.path.normpath(source)))
        return cls(cfg, params, AutoTokenizer.from_pretrained(tok_dir), sharder=sharder, **kwargs)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        text = self.tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.max_prompt_len :]  # keep the end: the generation prompt must stay

    def _padded(self, items: list, n: int) -> list:
        # Fixed-size batches: the last one repeats its first item so every call has one shape.
        return items + [items[0]] * (n - len(items))

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[str]:
        """One response per prompt (greedy by default), without the end-of-turn token."""
        ids = [self.prompt_ids(p) for p in prompts]
        out: list[str] = [""] * len(ids)
        # Similar lengths together: fewer pad tokens and fewer prompt buckets.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for b, lo in enumerate(range(0, len(order), self.batch_size)):
            idx = order[lo : lo + self.batch_size]
            res = generate(
                self.cfg,
                self.params,
                self._padded([ids[i] for i in idx], self.batch_size),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_id=self.eot_ids,
                seed=seed + b,
                sharder=self.sharder,
            )
            tokens, lengths = np.asarray(jax.device_get(res.tokens)), np.asarray(jax.device_get(res.lengths))
            for row, i in enumerate(idx):
                body = tokens[row, : lengths[row]]
                if lengths[row] and body[-1] in self.eot_ids:
                    body = body[:-1]
                out[i] = self.tokenizer.decode(body.tolist(), skip_special_tokens=True).strip()
        return out

    def embed(self, texts: Sequence[str], *, max_len: int = 256) -> np.ndarray:
        """[N, E] float32: the final-normed hidden states averaged over each text's tokens (no chat
        template), for prompt deduplication and clustering."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] or [0] for t in texts]
        out = np.zeros((len(ids), self.cfg.hidden_size), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            width = max(8, 1 << (max(len(ids[i]) for i in idx) - 1).bit_length())
            tokens = np.zeros((self.batch_size, width), np.int32)
            seg = np.zeros_like(tokens)
            for row, i in enumerate(idx):
                tokens[row, : len(ids[i])] = ids[i]
                seg[row, : len(ids[i])] = 1
            pos = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
            hidden = _forward(self.cfg, self.params, tokens, pos, seg, self.sharder, True)
            hidden = np.asarray(jax.device_get(hidden), np.float32)
            pooled = (hidden * seg[..., None]).sum(1) / np.maximum(seg.sum(1, keepdims=True), 1)
            out[idx] = pooled[: len(idx)]
        return out
