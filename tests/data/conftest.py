"""Tokenizers shared by the data tests: trained once per session on a small corpus (no hub)."""

from __future__ import annotations

import pytest

from align_jax.data.bpe import train_tokenizer

CORPUS = [
    "You are a helpful assistant.",
    "What is 17 plus 25?",
    "17 plus 25 is 42.",
    "Reverse the word apple.",
    "apple reversed is elppa.",
    "Write hello in capital letters.",
    "HELLO",
    "Hello there, how are you today?",
    "List three colors.\n1. red\n2. blue\n3. green",
    "Which is larger, 3 or 9? 9 is larger.",
] * 20


@pytest.fixture(scope="session")
def chatml():
    return train_tokenizer(CORPUS, vocab_size=320, template="chatml")


@pytest.fixture(scope="session")
def llama3():
    return train_tokenizer(CORPUS, vocab_size=320, template="llama3")


@pytest.fixture(scope="session", params=["chatml", "llama3"])
def tokenizer(request, chatml, llama3):
    return {"chatml": chatml, "llama3": llama3}[request.param]
