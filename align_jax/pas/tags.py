"""Category tags for prompts, and balancing across categories.

Taggers have `tag(prompts, embeddings) -> list[str]` (embeddings: the curation embedder's rows for the
same prompts; a tagger may ignore them).

- `CentroidTagger`: nearest class centroid among a few labelled example prompts per category, in the
  curation embedder's space. Cheap and deterministic; as good as the embedder separates the categories.
  With `min_similarity`, a prompt whose best cosine is lower is tagged "other".
- `TeacherTagger`: a chat model is shown the category list (templates.TAGGER_SYSTEM) and its reply is
  read back: the category named in it (whole word, case-insensitive, the earliest mention wins), else
  "other".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from align_jax.pas import templates
from align_jax.pas.embed import Embedder, normalize_rows


class CentroidTagger:
    def __init__(
        self, embedder: Embedder, examples: Mapping[str, Sequence[str]], *, min_similarity: float | None = None
    ):
        if not examples or any(not v for v in examples.values()):
            raise ValueError("CentroidTagger needs at least one example prompt for every category")
        self.categories = list(examples)
        centroids = [normalize_rows(embedder.embed(list(examples[c]))).mean(0) for c in self.categories]
        self.centroids = normalize_rows(np.stack(centroids))
        self.min_similarity = min_similarity

    def tag(self, prompts: Sequence[str], embeddings: np.ndarray) -> list[str]:
        if len(prompts) != len(embeddings):
            raise ValueError(f"{len(prompts)} prompts but {len(embeddings)} embeddings")
        if len(prompts) == 0:
            return []
        sims = normalize_rows(embeddings) @ self.centroids.T
        best = sims.argmax(1)
        out = [self.categories[b] for b in best]
        if self.min_similarity is not None:
            low = sims[np.arange(len(best)), best] < self.min_similarity
            out = [templates.OTHER if lo else c for c, lo in zip(out, low, strict=True)]
        return out


def parse_category(reply: str, categories: Sequence[str]) -> str:
    """The category the reply names (earliest whole-word mention, case-insensitive), else "other"."""
    best, where = templates.OTHER, len(reply) + 1
    for c in categories:
        m = re.search(rf"(?<!\w){re.escape(c)}(?!\w)", reply, flags=re.IGNORECASE)
        if m and m.start() < where:
            best, where = c, m.start()
    return best


class TeacherTagger:
    def __init__(self, model: Any, categories: Sequence[str], *, max_new_tokens: int = 8, batch: int = 256):
        if not categories:
            raise ValueError("TeacherTagger needs a non-empty category list")
        self.model, self.categories = model, list(categories)
        self.max_new_tokens, self.batch = max_new_tokens, batch

    def tag(self, prompts: Sequence[str], embeddings: np.ndarray | None = None) -> list[str]:
        out: list[str] = []
        for lo in range(0, len(prompts), self.batch):
            chats = [templates.tagger_messages(p, self.categories) for p in prompts[lo : lo + self.batch]]
            replies = self.model.generate(chats, max_new_tokens=self.max_new_tokens, temperature=0.0)
            out += [parse_category(r, self.categories) for r in replies]
        return out


def balance(
    categories: Sequence[str], cap: int | Mapping[str, int] | None, priority: Sequence[float] | None = None
) -> np.ndarray:
    """Sorted indices kept when every category keeps at most its cap (an int for all, or a mapping
    category -> cap; categories missing from the mapping are uncapped). Within a category the highest
    `priority` wins (ties: earlier index); without priorities, the earliest prompts."""
    n = len(categories)
    if cap is None:
        return np.arange(n)
    pri = np.zeros(n) if priority is None else np.nan_to_num(np.asarray(priority, np.float64), nan=-np.inf)
    order = sorted(range(n), key=lambda i: (-pri[i], i))
    used: dict[str, int] = {}
    kept = []
    for i in order:
        c = categories[i]
        limit = cap.get(c) if isinstance(cap, Mapping) else cap
        if limit is not None and used.get(c, 0) >= limit:
            continue
        used[c] = used.get(c, 0) + 1
        kept.append(i)
    return np.asarray(sorted(kept), np.int64)
