"""Prompt quality scores for curation: anything with `score(prompts) -> float [N]`, NaN where no score.

- `RewardQuality`: a trained reward model (`align_jax.eval.reward.RewardScorer`) scores each prompt
  followed by a fixed placeholder response. What the RM has learnt is response quality given a prompt,
  so this measures the prompt only indirectly (prompts it finds odd get low rewards whatever the
  response); use it as a coarse filter, with a threshold read off its score distribution.
- `JudgeQuality`: a chat model asked for a 1-10 score (templates.QUALITY_SYSTEM), greedy. The first
  integer 1..10 in the reply is the score (a "score: 7" or "7/10" reads as 7); a reply with none is
  NaN, counted by `curate` as unscored and dropped like the lowest score.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from align_jax.pas import templates


class Quality(Protocol):
    def score(self, prompts: Sequence[str]) -> np.ndarray: ...


class Generator(Protocol):
    """A ChatModel, or anything with its `generate` (scripted stand-ins in tests, the template teacher)."""

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> list[str]: ...


_SCORE = re.compile(r"(?<![\d.])(10|[1-9])(?![\d])(?!\.\d)")


def parse_score(text: str) -> float:
    """The first integer 1..10 in a judge's reply, else NaN ("0", "11", "7.5" alone are not scores)."""
    m = _SCORE.search(text or "")
    return float(m.group(1)) if m else float("nan")


class JudgeQuality:
    def __init__(self, model: Generator, *, max_new_tokens: int = 8, batch: int = 256):
        self.model, self.max_new_tokens, self.batch = model, max_new_tokens, batch
        self.replies: list[str] = []  # the last call's raw replies, for inspecting unparsable ones

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        replies: list[str] = []
        for lo in range(0, len(prompts), self.batch):
            chats = [templates.quality_messages(p) for p in prompts[lo : lo + self.batch]]
            replies += self.model.generate(chats, max_new_tokens=self.max_new_tokens, temperature=0.0)
        self.replies = replies
        return np.asarray([parse_score(r) for r in replies], np.float32)


class RewardQuality:
    def __init__(self, scorer: Any, *, response: str = "OK."):
        self.scorer, self.response = scorer, response

    @classmethod
    def load(cls, rm_workdir: str, **kwargs: Any) -> RewardQuality:
        from align_jax.eval.reward import RewardScorer

        return cls(RewardScorer.load(rm_workdir), **kwargs)

    def score(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.scorer.score(list(prompts), [self.response] * len(prompts)), np.float32)
