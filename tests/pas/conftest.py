"""A tiny random chat model for the PAS tests: trained tokenizer, random weights, no hub."""

from __future__ import annotations

import jax
import pytest

from align_jax.pas.templates import FEW_SHOT, PAS_SYSTEM

CORPUS = [PAS_SYSTEM, "system user assistant"] + [t for shots in FEW_SHOT.values() for pair in shots for t in pair]


@pytest.fixture(scope="session")
def tiny_parts():
    from align_jax.data.bpe import train_tokenizer
    from align_jax.models.config import ModelConfig
    from align_jax.models.transformer import init_params

    tok = train_tokenizer(CORPUS * 5, vocab_size=320, template="chatml")
    cfg = ModelConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        dtype="float32",
    )
    return cfg, init_params(cfg, jax.random.key(0)), tok


@pytest.fixture(scope="session")
def tiny_chat(tiny_parts):
    from align_jax.chat import ChatModel

    cfg, params, tok = tiny_parts
    return ChatModel(cfg, params, tok, batch_size=8, max_prompt_len=96)


@pytest.fixture(scope="session")
def tiny_hf_dir(tiny_parts, tmp_path_factory):
    from align_jax.models.hf import save_pretrained

    cfg, params, tok = tiny_parts
    path = str(tmp_path_factory.mktemp("pas_hf") / "model")
    save_pretrained(cfg, params, path, tokenizer=tok)
    return path
