"""GRPO's prompt data: rows {"prompt": str | [messages], ...fields the reward rules read, e.g. "answer"},
read as an endless, resumable stream (and, with PTX, beside the packed SFT batches)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from align_jax.data.formats import BadRowError
from align_jax.data.sources import open_source


def prompt_messages(row: Any, origin: Any) -> list[dict]:
    if not isinstance(row, Mapping) or "prompt" not in row:
        raise BadRowError(origin, "prompt", "a prompt row needs a 'prompt' (a string or a list of messages)")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise BadRowError(origin, "prompt", "expected a string or a non-empty list of {role, content} messages")


class PromptStream:
    """Endless, shuffled (one permutation per epoch), resumable prompt rows. Every host draws the same
    order and keeps the same position; each reads only its own slice of a rollout's prompts (`take`'s
    `part`), so the prompts of a rollout do not depend on how many hosts sample them."""

    def __init__(self, spec: str, seed: int):
        self.source = open_source(spec, split="train")
        self.seed, self.epoch, self.pos = seed, 0, 0
        self.rows = 0
        # The position a checkpoint records, when it is not the live one: with rollouts sampled ahead
        # (align_jax/sample_ahead.py) the stream has already served prompts whose samples a restart loses.
        self.held: dict | None = None
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        # One permutation per epoch, drawn once: a rollout should not reshuffle the whole prompt set.
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source)))
        return self._cached[1]

    def take(self, n: int, part: tuple[int, int] = (0, 1)) -> list[tuple[Any, Any]]:
        """The next `n` rows of the stream; with `part` = (i, k), only the i-th of k equal slices of them
        (process i of k reads only the prompts its devices sample), the stream moving past all `n`."""
        i, k = part
        if n % k or not 0 <= i < k:
            raise ValueError(f"{n} prompts cannot be split into {k} equal parts (part {i})")
        picked: list[int] = []
        while len(picked) < n:
            order = self._order()
            step = min(n - len(picked), len(order) - self.pos)
            picked += order[self.pos : self.pos + step].tolist()
            self.pos += step
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        self.rows += n
        per = n // k
        return self.source.read(picked[i * per : (i + 1) * per])

    def state(self, live: bool = False) -> dict:
        if self.held is not None and not live:
            return dict(self.held)
        return {"epoch": self.epoch, "pos": self.pos, "rows": self.rows, "num_rows": len(self.source)}

    def restore(self, state: Mapping[str, Any]) -> None:
        if int(state["num_rows"]) != len(self.source):
            raise ValueError(f"prompt data changed: {state['num_rows']} rows when saved, {len(self.source)} now")
        self.epoch, self.pos, self.rows = int(state["epoch"]), int(state["pos"]), int(state["rows"])
        self.held = None

    def stats(self) -> dict:
        return {"prompt_rows": self.rows, "epoch": self.epoch}


class Streams:
    """The prompt stream and, with PTX, the SFT batches, as one resumable data iterator."""

    def __init__(self, prompts: PromptStream, ptx: Any = None):
        self.prompts, self.ptx = prompts, ptx

    def state(self) -> dict:
        return {"prompts": self.prompts.state(), "ptx": self.ptx.state() if self.ptx is not None else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.prompts.restore(state["prompts"])
        if self.ptx is not None and state.get("ptx"):
            self.ptx.restore(state["ptx"])

    def stats(self) -> dict:
        out = self.prompts.stats()
        if self.ptx is not None:
            out["ptx_packing_efficiency"] = self.ptx.stats().get("packing_efficiency", 0.0)
        return out
