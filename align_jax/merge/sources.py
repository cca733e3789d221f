"""The models a merge reads, one param leaf at a time, in our layout: align_jax stage workdirs (Orbax) and
Hugging Face directories (safetensors).

A leaf is read to host numpy and nothing else of the source is held, so a merge needs about one model of
host memory (its output) plus one leaf per source."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from align_jax import checkpoint
from align_jax.models import hf
from align_jax.models.config import RUNTIME_FIELDS, ModelConfig
from align_jax.models.hf_config import from_hf_dict, read_hf_config

# ModelConfig fields that may differ between merged models (token ids a tokenizer set, how far RoPE was
# declared to reach, the init scale): the output takes the anchor's. Every other architecture field
# decides a shape or the function the weights compute, and must match.
LENIENT_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "initializer_range")
HF_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class Source:
    """One model to merge. `read(leaf, shape)` returns that leaf of its params as a numpy array."""

    path: str
    kind: str
    cfg: ModelConfig
    step: int | None = None

    def read(self, leaf: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def tokenizer_dir(self) -> str | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WorkdirSource(Source):
    """A stage workdir's latest checkpoint: the causal LM's params (the policy's, for PPO)."""

    kind = "workdir"

    def __init__(self, path: str):
        self.path = path
        saved = checkpoint.read_config(path)
        stage = saved.get("config", {}).get("stage")
        key = checkpoint.decoder_key(saved)
        if key is None:
            raise ValueError(f"{path}: a reward model (stage {stage!r}: decoder + scalar head); merge causal LMs only")
        if "hf_model_config" not in saved:
            raise ValueError(f"{path}: its saved config has no 'hf_model_config'")
        if saved.get("lora"):  # leaves are read one by one from the checkpoint, which holds adapters only
            raise ValueError(
                f"{path}: a LoRA run, whose checkpoints hold its adapters only; export it merged "
                "(launch/export.py --lora merged) and merge that directory"
            )
        runtime = {k: v for k, v in saved.get("runtime", {}).items() if k in RUNTIME_FIELDS}
        self.cfg = from_hf_dict(saved["hf_model_config"], where=f"{path} (saved config)", **runtime)
        self.prefix = ("params", key) if key else ("params",)
        self.manager = checkpoint.open_reader(path, "merge source")
        self.step = self.manager.latest_step()

    def read(self, leaf: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        def nested(value: Any) -> dict:
            for k in reversed(self.prefix + leaf):
                value = {k: value}
            return value

        # A numpy restore type reads the stored array whatever the placeholder's shape: no device, no sharding.
        args = ocp.args.PyTreeRestore(
            item=nested(np.zeros((), np.float32)),
            restore_args=nested(ocp.RestoreArgs(restore_type=np.ndarray)),
            partial_restore=True,
        )
        try:
            out = self.manager.restore(self.step, args=ocp.args.Composite(state=args)).state
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ValueError(f"{self.path}: step {self.step} has no param {'/'.join(leaf)} ({e})") from None
        for k in self.prefix + leaf:
            out = out[k]
        return _checked(np.asarray(out), shape, f"{self.path} step {self.step}", leaf)

    def tokenizer_dir(self) -> str | None:
        from align_jax.workdir import TOKENIZER_DIR

        tok = os.path.join(self.path, TOKENIZER_DIR)
        return tok if os.path.isfile(os.path.join(tok, "tokenizer_config.json")) else None

    def close(self) -> None:
        self.manager.close()


class HFSource(Source):
    """A Hugging Face directory: each leaf is read from the safetensors memory maps and mapped to our layout
    (a stacked leaf from its per-layer tensors)."""

    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        self.cfg = read_hf_config(path)

    def read(self, leaf: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        return hf.read_leaf(self.cfg, self.path, leaf, shape)

    def tokenizer_dir(self) -> str | None:
        return self.path if any(os.path.isfile(os.path.join(self.path, f)) for f in HF_TOKENIZER_FILES) else None


def _checked(x: np.ndarray, shape: tuple[int, ...], where: str, leaf: tuple[str, ...]) -> np.ndarray:
    if x.shape != tuple(shape):
        raise ValueError(f"{where}: param {'/'.join(leaf)} has shape {x.shape}, its config implies {tuple(shape)}")
    return x


def open_source(path: str) -> Source:
    """A workdir (with checkpoints/) or an HF directory (with config.json)."""
    path = os.path.abspath(os.fspath(path))
    if checkpoint.is_hf_dir(path):
        return HFSource(path)
    if os.path.isdir(checkpoint.checkpoint_dir(path)):
        return WorkdirSource(path)
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face directory (no config.json) nor a stage workdir "
        f"(no {checkpoint.CHECKPOINT_DIR}/)"
    )


def check_same_architecture(anchor: Source, others: list[Source]) -> None:
    """Every source must have the anchor's architecture; the error names the source and the field."""
    skip = set(RUNTIME_FIELDS) | set(LENIENT_FIELDS)
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in skip]
    for src in others:
        for field in fields:
            a, b = getattr(anchor.cfg, field), getattr(src.cfg, field)
            if a != b:
                raise ValueError(
                    f"{src.path}: {field}={b!r}, but {anchor.path} has {field}={a!r}; "
                    "merged models must share one architecture"
                )
