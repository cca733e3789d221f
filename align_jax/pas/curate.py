"""Prompt curation: exact and near-duplicate removal, diversity by clustering, quality filter, category
tags and per-category caps, with how many prompts each step keeps.

    result = curate(prompts, embedder=HashedEmbedder(), dedup_threshold=0.9, n_clusters=200,
                    per_cluster=20, tagger=tagger, balance_cap=500, seed=0)
    result.counts   # {"input": 20000, "after_exact_dedup": ..., "after_dedup": ..., "after_diversity": ...,
                    #  "after_quality": ..., "after_balance": ..., "unscored": 0}
    result.rows     # [{"prompt", "category", "cluster", "quality", "index"}], in input order

Steps, in order (the embeddings are computed once, after exact dedup):
1. exact dedup: whitespace-collapsed, case-folded text; the first occurrence stays.
2. near-dup: greedy keep-first by cosine >= dedup_threshold (dedup.dedup_mask, blocked on device).
3. diversity: k-means (an int n_clusters) or hierarchical k-means (a sequence, e.g. (50, 8)), then up
   to per_cluster prompts per cluster ("nearest" the centroid, or "spread"); per_cluster=None keeps all.
4. quality: prompts scoring below min_quality are dropped; unscorable ones (NaN) always are, and are
   counted in counts["unscored"].
5. tags: tagger.tag(prompts, embeddings); without a tagger every prompt is "other".
6. balance: at most balance_cap prompts per category (an int, or a mapping per category), preferring
   higher quality, then the earlier prompt.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from align_jax.metrics import Progress
from align_jax.pas import templates
from align_jax.pas.cluster import hierarchical_kmeans, kmeans, select_per_cluster
from align_jax.pas.dedup import dedup_mask
from align_jax.pas.embed import Embedder, normalize_rows
from align_jax.pas.quality import Quality
from align_jax.pas.tags import balance

log = logging.getLogger(__name__)


class Tagger(Protocol):
    def tag(self, prompts: Sequence[str], embeddings: np.ndarray) -> list[str]: ...


@dataclasses.dataclass
class CurationResult:
    rows: list[dict[str, Any]]  # prompt, category, cluster, quality (float | None), index (into the input)
    counts: dict[str, int]
    seconds: dict[str, float]  # wall time per step

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.rows]


def text_key(text: str) -> str:
    return " ".join(text.split()).casefold()


_STEPS = ("exact_dedup", "embed", "dedup", "diversity", "quality", "tag", "balance")


class _StepClock:
    """Wall time per curation step, and the optional bar over the steps: embedding and clustering take
    minutes on large prompt sets, so the bar says which step finished and how many prompts remain."""

    def __init__(self, progress: bool) -> None:
        self.seconds: dict[str, float] = {}
        self.clock = time.perf_counter()
        self.bar = Progress(len(_STEPS)) if progress else None

    def lap(self, step: str, n_prompts: int) -> None:
        """Ends `step`: its time is from the end of the previous step."""
        now = time.perf_counter()
        self.seconds[step] = round(now - self.clock, 3)
        self.clock = now
        if self.bar is not None:
            self.bar.update(_STEPS.index(step) + 1, f"curate: {step} ({n_prompts} prompts)")

    def close(self) -> None:
        """Ends the bar's line on a terminal, so the next output starts on its own line."""
        if self.bar is not None:
            self.bar.close()


def _check_args(prompts: Sequence[str], n_clusters: int | Sequence[int]) -> tuple[int, ...]:
    """Fails on a non-string prompt or bad cluster counts before any (slow) step runs; returns the
    cluster count of each k-means level (one level for an int)."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"curate: prompt {i} is a {type(p).__name__}, not a string")
    if isinstance(n_clusters, int):
        levels: tuple[int, ...] = (n_clusters,)
    else:
        levels = tuple(int(k) for k in n_clusters)
    if not levels or any(k <= 0 for k in levels):
        raise ValueError(f"curate: n_clusters must be a positive int or a sequence of them, got {n_clusters!r}")
    return levels


def _exact_dedup(prompts: Sequence[str]) -> np.ndarray:
    """Indices of the first prompt of each normalized text, before embedding, so duplicates cost no
    embedding; empty prompts are dropped here too (nothing to augment)."""
    seen: set[str] = set()
    idx = []
    for i, p in enumerate(prompts):
        key = text_key(p)
        if key and key not in seen:
            seen.add(key)
            idx.append(i)
    return np.asarray(idx, np.int64)


def _embed(prompts: Sequence[str], index: np.ndarray, embedder: Embedder) -> np.ndarray:
    """Unit-norm embeddings of the kept prompts, one row each (checked: every later step indexes both
    arrays together)."""
    emb = normalize_rows(embedder.embed([prompts[i] for i in index])) if len(index) else np.zeros((0, 1), np.float32)
    if len(emb) != len(index):
        raise ValueError(f"curate: the embedder returned {len(emb)} rows for {len(index)} prompts")
    return emb


def _diversify(
    index: np.ndarray,
    emb: np.ndarray,
    levels: tuple[int, ...],
    per_cluster: int | None,
    select: str,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clusters the prompts and keeps up to `per_cluster` of each cluster, so no one topic dominates;
    returns the kept (index, emb, cluster). Every cluster label is 0 when nothing is left to cluster."""
    cluster = np.zeros(len(index), np.int64)
    if len(index):
        km = kmeans(emb, levels[0], seed=seed) if len(levels) == 1 else hierarchical_kmeans(emb, levels, seed=seed)
        cluster = km.labels
        if per_cluster is not None:
            pick = select_per_cluster(emb, km.labels, km.centroids, per_cluster, how=select)
            index, emb, cluster = index[pick], emb[pick], cluster[pick]
    return index, emb, cluster


def _quality_filter(
    prompts: Sequence[str],
    index: np.ndarray,
    emb: np.ndarray,
    cluster: np.ndarray,
    quality: Quality | None,
    min_quality: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Drops unscorable prompts (NaN) and those below `min_quality`; returns the kept (index, emb, cluster,
    scores) and how many were unscorable. Scores are None without a quality model (or without prompts),
    and balance then ranks by input order alone."""
    if quality is None or not len(index):
        return index, emb, cluster, None, 0
    scores = np.asarray(quality.score([prompts[i] for i in index]), np.float32)
    if scores.shape != (len(index),):
        raise ValueError(f"curate: quality returned shape {scores.shape} for {len(index)} prompts")
    unscored = int(np.isnan(scores).sum())
    ok = ~np.isnan(scores)
    if min_quality is not None:
        ok &= np.nan_to_num(scores, nan=-np.inf) >= min_quality
    return index[ok], emb[ok], cluster[ok], scores[ok], unscored


def _tag(texts: list[str], emb: np.ndarray, tagger: Tagger | None) -> list[str]:
    """One category per prompt (checked, since balance caps by them); every prompt is "other" without a
    tagger."""
    categories = list(tagger.tag(texts, emb)) if tagger is not None and len(texts) else [templates.OTHER] * len(texts)
    if len(categories) != len(texts):
        raise ValueError(f"curate: the tagger returned {len(categories)} tags for {len(texts)} prompts")
    return categories


def _rows(
    kept: np.ndarray,
    texts: list[str],
    categories: list[str],
    cluster: np.ndarray,
    scores: np.ndarray | None,
    index: np.ndarray,
) -> list[dict[str, Any]]:
    """The result rows of the prompts balance kept, as plain Python values (JSON-ready); `index` points
    into the input, so a caller can join the rows back to its own records."""
    return [
        {
            "prompt": texts[j],
            "category": categories[j],
            "cluster": int(cluster[j]),
            "quality": None if scores is None else float(scores[j]),
            "index": int(index[j]),
        }
        for j in kept
    ]


def curate(
    prompts: Sequence[str],
    *,
    embedder: Embedder,
    dedup_threshold: float = 0.9,
    n_clusters: int | Sequence[int] = 100,
    per_cluster: int | None = 10,
    select: str = "nearest",
    quality: Quality | None = None,
    min_quality: float | None = None,
    tagger: Tagger | None = None,
    balance_cap: int | Mapping[str, int] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> CurationResult:
    """Curates `prompts` (strings); see the module docstring for the steps. `progress` shows a bar over
    the steps (embedding and clustering take minutes on large prompt sets)."""
    levels = _check_args(prompts, n_clusters)
    counts = {"input": len(prompts)}
    clock = _StepClock(progress)

    index = _exact_dedup(prompts)
    counts["after_exact_dedup"] = len(index)
    clock.lap("exact_dedup", len(index))
    emb = _embed(prompts, index, embedder)
    clock.lap("embed", len(index))
    keep = dedup_mask(emb, dedup_threshold)
    index, emb = index[keep], emb[keep]
    counts["after_dedup"] = len(index)
    clock.lap("dedup", len(index))
    index, emb, cluster = _diversify(index, emb, levels, per_cluster, select, seed)
    counts["after_diversity"] = len(index)
    clock.lap("diversity", len(index))
    index, emb, cluster, scores, counts["unscored"] = _quality_filter(
        prompts, index, emb, cluster, quality, min_quality
    )
    counts["after_quality"] = len(index)
    clock.lap("quality", len(index))
    texts = [prompts[i] for i in index]
    categories = _tag(texts, emb, tagger)
    clock.lap("tag", len(index))
    kept = balance(categories, balance_cap, scores)
    counts["after_balance"] = len(kept)
    clock.lap("balance", len(index))

    rows = _rows(kept, texts, categories, cluster, scores, index)
    clock.close()
    log.info("curate: kept %s; seconds %s", counts, clock.seconds)
    return CurationResult(rows, counts, clock.seconds)
