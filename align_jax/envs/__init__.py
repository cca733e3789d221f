"""Environments for multi-turn and tool rollouts (align_jax/env_rollout.py), by name:
`env_factory("calculator", max_turns=3)` makes a fresh CalculatorEnv for each episode."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from align_jax.envs.base import Environment, StepResult
from align_jax.envs.calculator import DEMO_PROBLEMS, CalculatorEnv

ENVS: dict[str, type[Environment]] = {"calculator": CalculatorEnv}


def env_factory(name: str, **kwargs: Any) -> Callable[[], Environment]:
    """A factory of fresh environments (one per episode) of the registered kind `name`."""
    if name not in ENVS:
        raise ValueError(f"env={name!r}; expected one of {sorted(ENVS)}")
    return functools.partial(ENVS[name], **kwargs)


__all__ = ["DEMO_PROBLEMS", "ENVS", "CalculatorEnv", "Environment", "StepResult", "env_factory"]
