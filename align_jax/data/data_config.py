"""What every data config (SFT, preference) shares: checked choices and minimums, and construction from
an instance, a dict or an ml_collections ConfigDict that fails on unknown keys."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

ConfigT = TypeVar("ConfigT", bound="DataConfigMixin")


class DataConfigMixin:
    """What the data configs (frozen dataclasses) share: key checking and construction from any mapping."""

    def _check(self, choices: Mapping[str, Sequence[Any]], minimums: Mapping[str, int]) -> None:
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name}={value!r}; expected an integer >= {low}")

    @classmethod
    def from_any(cls: type[ConfigT], cfg: Any = None, **overrides: Any) -> ConfigT:
        """From an instance, a dict, or an ml_collections ConfigDict (plus keyword overrides).
        Unknown keys fail here, with the known ones listed, rather than being silently ignored."""
        if cfg is None:
            values: dict[str, Any] = {}
        elif isinstance(cfg, cls):
            values = dataclasses.asdict(cfg)  # type: ignore[call-overload]
        elif hasattr(cfg, "to_dict"):
            values = cfg.to_dict()
        elif isinstance(cfg, Mapping):
            values = dict(cfg)
        else:
            raise TypeError(f"data config must be a dict, ConfigDict or {cls.__name__}, got {type(cfg).__name__}")
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)
