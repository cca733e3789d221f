"""Prompt embedders for curation: anything with `embed(texts) -> float32 [N, E]`.

Three kinds, by what exists when curation runs:

- `HashedEmbedder`: hashed bag of word 1-2-grams and in-word character 3-grams. No model, no device,
  deterministic across processes and machines. Catches lexical near-duplicates (the same template with
  another number or word) and groups prompts by surface form. Use it before any model exists (the tiny
  demo's first stage), as a cheap pre-pass over very large sets, or when paraphrases need not merge.
- `align_jax.chat.ChatModel` (a stage workdir or an HF causal-LM directory): `.embed` mean-pools the
  decoder's final hidden states. Semantic enough to merge light paraphrases; costs one forward pass
  per prompt on the accelerator. Use it when the base/SFT model is at hand and no encoder is. Such
  states are anisotropic (unrelated prompts often have cosine > 0.9), so dedup thresholds must be
  higher than for an encoder: on the demo SFT model 0.9 keeps 41 of 7980 prompts, 0.995 keeps 3345.
- `HFEncoderEmbedder`: an HF encoder directory (BERT/E5/BGE-style), mean-pooled with torch.
  Sentence encoders trained for similarity are the best choice for semantic dedup and clustering of
  real prompts; torch is imported only when one is built.

`load_embedder(spec)` picks one from a string: "hashed" / "hashed:DIM", or a directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _bucket(feature: str, dim: int, seed: int) -> tuple[int, float]:
    # blake2b, not hash(): Python salts str hashes per process, and embeddings must be reproducible.
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little")).digest()
    value = int.from_bytes(digest, "little")
    # The sign bit makes colliding features cancel on average instead of piling up (signed feature hashing).
    return (value >> 1) % dim, 1.0 if value & 1 else -1.0


class HashedEmbedder:
    """Signed feature hashing of word unigrams and bigrams and in-word character n-grams, with
    sublinear term weights (1 + log tf), L2-normalised. Lower-cased; texts with no word characters
    embed to zeros."""

    def __init__(self, dim: int = 256, *, word_ngrams: int = 2, char_ngrams: int = 3, seed: int = 0):
        if dim <= 0 or word_ngrams < 1 or char_ngrams < 0:
            raise ValueError(
                f"HashedEmbedder: need dim > 0, word_ngrams >= 1, char_ngrams >= 0; got {dim}, {word_ngrams}, {char_ngrams}"
            )
        self.dim, self.word_ngrams, self.char_ngrams, self.seed = dim, word_ngrams, char_ngrams, seed
        self._cache: dict[str, tuple[int, float]] = {}

    def features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        feats = [
            f"w{n}:" + " ".join(words[i : i + n])
            for n in range(1, self.word_ngrams + 1)
            for i in range(len(words) - n + 1)
        ]
        if self.char_ngrams:
            n = self.char_ngrams
            for w in words:
                padded = f"<{w}>"
                feats += [f"c:{padded[i : i + n]}" for i in range(max(1, len(padded) - n + 1))]
        return feats

    def _embed_one(self, text: str) -> np.ndarray:
        counts: dict[int, float] = {}
        tf: dict[str, int] = {}
        for f in self.features(text):
            tf[f] = tf.get(f, 0) + 1
        for f, n in tf.items():
            hit = self._cache.get(f)
            if hit is None:
                hit = self._cache[f] = _bucket(f, self.dim, self.seed)
                if len(self._cache) > 1_000_000:  # bound memory on huge vocabularies
                    self._cache.clear()
            b, sign = hit
            counts[b] = counts.get(b, 0.0) + sign * (1.0 + math.log(n))
        v = np.zeros(self.dim, np.float32)
        if counts:
            v[list(counts)] = list(counts.values())
            norm = float(np.linalg.norm(v))
            if norm > 0:
                v /= norm
        return v

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            out[i] = self._embed_one(t)
        return out


class HFEncoderEmbedder:
    """Mean-pooled `last_hidden_state` of a Hugging Face encoder (`transformers.AutoModel`) over each
    text's real tokens. Texts are padded by hand (the tokenizer needs no pad token) and truncated to
    `max_len` tokens. Needs torch (`pip install torch`), imported here only."""

    def __init__(self, path: str, *, batch_size: int = 32, max_len: int = 256, device: str = "cpu"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"HFEncoderEmbedder({path!r}) needs torch; install it (pip install torch)") from e
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.batch_size, self.device = batch_size, device
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_len
        self.max_len = min(max_len, limit)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        ids = [self.tokenizer(t, truncation=True, max_length=self.max_len)["input_ids"] or [0] for t in texts]
        out = np.zeros((len(ids), self.model.config.hidden_size), np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            tokens = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                tokens[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            with torch.no_grad():
                hidden = self.model(
                    input_ids=tokens.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
            m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            out[idx] = pooled.float().cpu().numpy()
        return out


def _causal_lm_dir(path: str) -> bool:
    from align_jax.models.config import ARCHITECTURES

    if os.path.isdir(os.path.join(path, "checkpoints")):
        return True  # an align_jax stage workdir
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") in ARCHITECTURES
    except (OSError, ValueError):
        return False


def load_embedder(spec: str, **kwargs: Any) -> Embedder:
    """ "hashed" or "hashed:DIM" -> HashedEmbedder; an align_jax workdir or an HF decoder directory of a
    supported family (llama, qwen2, mistral) -> ChatModel (its `.embed`); any other HF directory ->
    HFEncoderEmbedder. kwargs go to the constructor (ChatModel: to `ChatModel.load`)."""
    if spec == "hashed" or spec.startswith("hashed:"):
        dim = spec.partition(":")[2]
        if dim and not dim.isdigit():
            raise ValueError(f"embedder spec {spec!r}: expected 'hashed' or 'hashed:DIM' with an integer DIM")
        return HashedEmbedder(int(dim) if dim else 256, **kwargs)
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"embedder {spec!r}: not 'hashed[:DIM]' and not a directory")
    if _causal_lm_dir(spec):
        from align_jax.chat import ChatModel

        return ChatModel.load(spec, **kwargs)
    return HFEncoderEmbedder(spec, **kwargs)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm; all-zero rows stay zero (cosine 0 with everything)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, E], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x))[0, 0])
        raise ValueError(f"embedding row {bad} is not finite")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0).astype(np.float32)
