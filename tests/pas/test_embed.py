"""Embedders: the hashed bag of n-grams, and an HF encoder directory (a tiny random BERT)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from align_jax.pas.embed import HashedEmbedder, HFEncoderEmbedder, load_embedder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = ["What is 35 plus 3?", "What is 36 plus 3?", "Reverse the word dog.", "List three colors.", ""]


def test_hashed_is_deterministic_across_processes():
    ours = HashedEmbedder(64).embed(TEXTS[:2])
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
        "from align_jax.pas.embed import HashedEmbedder;"
        "np.save(sys.stdout.buffer, HashedEmbedder(64).embed(['What is 35 plus 3?', 'What is 36 plus 3?']))"
    )
    # Another hash seed: Python's own str hash would differ; the embedding must not.
    env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, check=True, env=env).stdout
    import io

    np.testing.assert_array_equal(np.load(io.BytesIO(out)), ours)


def test_hashed_geometry():
    e = HashedEmbedder(256).embed(TEXTS)
    assert e.shape == (5, 256) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e[:4], axis=1), 1.0, rtol=1e-6)
    assert not e[4].any()  # no words: the zero vector
    sims = e @ e.T
    # Same template, one digit apart: far closer than unrelated prompts.
    assert sims[0, 1] > 0.6
    assert sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3
    # Word order matters through bigrams; case does not.
    a, b, c = HashedEmbedder(256).embed(["dog bites man", "man bites dog", "DOG Bites MAN"])
    assert a @ b < 0.99 and a @ c == pytest.approx(1.0)
    np.testing.assert_array_equal(
        HashedEmbedder(256, seed=1).embed(TEXTS[:1]), HashedEmbedder(256, seed=1).embed(TEXTS[:1])
    )
    assert not np.array_equal(HashedEmbedder(256, seed=1).embed(TEXTS[:1]), e[:1])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from align_jax.data.bpe import train_tokenizer

    tok = train_tokenizer(
        TEXTS * 10 + ["a short one", "a much longer text with many more words in it"] * 10, vocab_size=300
    )
    cfg = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("bert"))
    transformers.BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_encoder_mean_pools_real_tokens(bert_dir):
    import torch

    emb = HFEncoderEmbedder(bert_dir, batch_size=4)
    texts = ["a short one", "a much longer text with many more words in it", "What is 35 plus 3?"]
    e = emb.embed(texts)
    assert e.shape == (3, 32) and e.dtype == np.float32 and np.all(np.isfinite(e))
    # A text's embedding does not depend on what it is batched with (padding is masked out) ...
    np.testing.assert_allclose(emb.embed(texts[:1])[0], e[0], atol=1e-5)
    # ... and is the plain mean of the encoder's last hidden states over its tokens.
    ids = torch.tensor([emb.tokenizer(texts[1])["input_ids"]])
    with torch.no_grad():
        ref = emb.model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(e[1], ref, atol=1e-5)
    assert isinstance(load_embedder(bert_dir), HFEncoderEmbedder)


def test_hf_encoder_without_torch_says_so(bert_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="needs torch"):
        HFEncoderEmbedder(bert_dir)


def test_load_embedder_specs(tmp_path):
    assert load_embedder("hashed").dim == 256
    assert load_embedder("hashed:64").dim == 64
    with pytest.raises(ValueError, match="hashed:DIM"):
        load_embedder("hashed:big")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_embedder(str(tmp_path / "missing"))
