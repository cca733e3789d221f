"""A causal LM with its tokenizer, text in and text out: what evaluation, the PAS teacher and judge, and
prompt augmentation need from a model.

    model = ChatModel.load("runs/sft-demo")            # a stage workdir, or an HF directory
    model.generate(["What is 2 plus 2?"], max_new_tokens=32)                  # -> ["2 plus 2 is 4."]
    model.generate([[{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]])
    model.embed(["some text", ...])                     # [N, E] mean-pooled final hidden states

Prompts are rendered with the tokenizer's chat template (generation prompt on) and sampled with
`align_jax.generate` in fixed-size batches whose prompt width is a power-of-two bucket, so a long list
of prompts compiles once per bucket, not once per call. A row stops at the template's end-of-turn token.

Sharding. A ChatModel's params live on its `sharder`'s mesh, in the shardings the model's logical axes
give them there, so each device holds its slice of the weights, not a copy. The default mesh puts every
local device on `fsdp` (`eval_sharder`): an evaluation holds several models at once (policy, reference,
reward model, PAS model), and replicated an 8B model alone fills most of a device. The batch is split
over `fsdp` too (the `activation_batch` rule), so generation and scoring stay data-parallel; each layer's
weights (and the LM head) are gathered only while they run, which is why sharded params decode through
the stacked layer scan (see `ChatModel.__init__`). Loading places every tensor straight into its sharding
(HF files: per-device slices read from disk; checkpoints: Orbax restores into the target shardings; a
fresh init: jit with out_shardings), so no device ever holds a whole copy of the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from align_jax import checkpoint
from align_jax.data.tokenize import end_of_turn_ids
from align_jax.generate import generate
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import _forward
from align_jax.sharding import Sharder, make_mesh, normalize_rules, tree_shardings

Prompt = str | Sequence[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


# Every local device on fsdp: see the module docstring for why evaluation models default to it.
DEFAULT_EVAL_MESH = {"fsdp": -1}


def eval_sharder(mesh: Mapping[str, Any] | None = None) -> Sharder:
    """The Sharder of evaluation models over this host's devices. `mesh` maps mesh axes (data, fsdp,
    tensor, sequence, expert; one may be -1: the devices the others leave) to sizes, and may hold
    `rules`, overrides of the default logical-axis rules as (logical_name, mesh_axes) pairs; None or
    {} puts every local device on fsdp."""
    shape = dict(mesh or {})
    overrides = shape.pop("rules", None) or ()
    rules = dict(normalize_rules(None))
    rules.update(normalize_rules(overrides))
    return Sharder(make_mesh(shape or DEFAULT_EVAL_MESH, devices=jax.local_devices()), tuple(rules.items()))


def default_sharder() -> Sharder:
    """Every local device on fsdp: each holds 1/n of the weights, and batches are split n ways."""
    return eval_sharder(None)


@functools.lru_cache(maxsize=16)
def boxed_abstract(cfg: ModelConfig, sharder: Sharder) -> Any:
    """The abstract params of `cfg`'s decoder (LoRA off) with their logical axes. Cached: tracing the init
    takes a while, and loading a model, placing it and a pipeline's every checkpoint of one shape ask again."""
    from align_jax.models.hf import abstract_params

    return abstract_params(cfg.replace(lora_rank=0), sharder)


def place_params(cfg: ModelConfig, params: Any, sharder: Sharder) -> Any:
    """`params` in the shardings that `cfg`'s logical axes give them on `sharder`'s mesh. Leaves already
    there stay as they are (no copy); others (host arrays, one device's, another mesh's) move one slice
    per device, so nothing is gathered whole."""
    if sharder.mesh is None:
        return params
    shardings = tree_shardings(boxed_abstract(cfg, sharder), sharder)
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ValueError(
            f"ChatModel: the params tree does not match a {cfg.model_type} model of this config "
            f"({len(jax.tree.leaves(params))} leaves, the config makes {len(jax.tree.leaves(shardings))})"
        )
    return jax.device_put(params, shardings)


def _replicated(x: Any) -> bool:
    sharding = getattr(x, "sharding", None)  # host arrays: whatever the call places them as
    return sharding is None or sharding.is_fully_replicated


def load_model_params(
    source: str, *, dtype: str = "float32", step: int | None = None, sharder: Sharder | None = None
) -> tuple[ModelConfig, Any, str]:
    """(ModelConfig, params, tokenizer dir) of a causal LM in an HF directory or a stage workdir, the
    params read straight into their shardings on `sharder`'s mesh (default: `default_sharder()`)."""
    from align_jax.models.hf import load_pretrained
    from align_jax.workdir import TOKENIZER_DIR

    sharder = sharder or default_sharder()
    if checkpoint.is_hf_dir(source):
        cfg, params = load_pretrained(source, dtype=dtype, compute_dtype=dtype, sharder=sharder)
        return cfg, params, source
    cfg = checkpoint.model_config_of(source, param_dtype=dtype, dtype=dtype, remat_policy="none")
    boxed = boxed_abstract(cfg, sharder)
    abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), tree_shardings(boxed, sharder))
    key = checkpoint.decoder_key(checkpoint.read_config(source, step))
    if key is None:
        raise ValueError(f"{source} holds a reward model (decoder + scalar head), not a causal LM")
    # restore_params, not restore_decoder_params: only it takes the sharder, which a LoRA workdir over an HF
    # base needs to read that base in slices instead of whole onto one device.
    params = checkpoint.restore_params(source, {key: abstract} if key else abstract, step, sharder=sharder)
    return cfg, params[key] if key else params, os.path.join(source, TOKENIZER_DIR)


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
        self.sharder = sharder or default_sharder()
        self.cfg, self.params, self.tokenizer = cfg, place_params(cfg, params, self.sharder), tokenizer
        # Sharded params decode through the stacked layer scan: generate's per-layer copy of the weights
        # (unstack_layers, faster on CPU) would let XLA gather every layer whole at once, a full copy of the
        # model on each device (measured: 1.7x a layer's full size per layer instead of 1/8 of it on fsdp=8).
        self.unstack_layers = all(_replicated(x) for x in jax.tree.leaves(self.params))
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
                unstack_layers=self.unstack_layers,
            )
            tokens, lengths = np.asarray(jax.device_get(res.tokens)), np.asarray(jax.device_get(res.lengths))
            for row, i in enumerate(idx):
                body = tokens[row, : lengths[row]]
                if lengths[row] and body[-1] in self.eot_ids:
                    body = body[:-1]
                out[i] = self.tokenizer.decode(body.tolist(), skip_special_tokens=True).strip()
        return out

    def _on_mesh(self, x_BT: np.ndarray) -> Any:
        """A [B, T] host batch split over the mesh's batch axes (replicated where they do not divide B)."""
        if self.sharder.mesh is None:
            return x_BT
        return jax.device_put(x_BT, self.sharder.sharding(("activation_batch", None), x_BT.shape))

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
            batch = (self._on_mesh(x) for x in (tokens, pos, seg))
            hidden = _forward(self.cfg, self.params, *batch, self.sharder, True)
            hidden = np.asarray(jax.device_get(hidden), np.float32)
            pooled = (hidden * seg[..., None]).sum(1) / np.maximum(seg.sum(1, keepdims=True), 1)
            out[idx] = pooled[: len(idx)]
        return out
