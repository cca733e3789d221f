"""The locally trained tokenizers: vocabulary, special tokens, real templates, save/load round trip."""

from __future__ import annotations

import json

import pytest
import transformers

from align_jax.data.bpe import train_tokenizer
from align_jax.data.demo.make_demo_data import make_demo_data
from tests.data.conftest import CORPUS

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]


def test_vocab_size_and_special_tokens(chatml, llama3):
    train_lines, _ = make_demo_data(train_size=2000, eval_size=0)
    texts = [m["content"] for line in train_lines for m in json.loads(line)["messages"]]
    tok = train_tokenizer(texts, vocab_size=512)
    assert len(tok) == 512
    # Deterministic: a resumed run that retrains the demo tokenizer gets the very same one.
    assert train_tokenizer(texts, vocab_size=512).backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert (chatml.bos_token, chatml.eos_token, chatml.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert (llama3.bos_token, llama3.eos_token, llama3.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    )
    for tok in (chatml, llama3):
        assert tok.pad_token_id != tok.eos_token_id
        # Special tokens are single tokens, never split or merged with text.
        assert tok("x<|im_start|>y" if tok is chatml else "x<|eot_id|>y", add_special_tokens=False)["input_ids"][1] in (
            tok.convert_tokens_to_ids("<|im_start|>"),
            tok.eos_token_id,
        )


def test_chatml_renders_qwen_style(chatml):
    assert chatml.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert chatml.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_renders_llama_style(llama3):
    assert llama3.apply_chat_template(MESSAGES, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    assert llama3.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # Like the real tokenizer, plain encoding prepends BOS.
    assert llama3("Hi")["input_ids"][0] == llama3.bos_token_id


def test_templates_have_no_generation_markers(tokenizer):
    assert "generation" not in tokenizer.chat_template.replace("add_generation_prompt", "")


def test_byte_level_round_trip_and_single_digits(chatml):
    text = "Grüße, 你好! 12345 \t\n\n tabs"
    ids = chatml(text, add_special_tokens=False)["input_ids"]
    assert chatml.decode(ids) == text
    digits = [chatml.decode([i]) for i in chatml("1234", add_special_tokens=False)["input_ids"]]
    assert digits == ["1", "2", "3", "4"]


def test_save_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "What is 17 plus 25? HELLO there."
    for add in (True, False):
        assert loaded(text, add_special_tokens=add)["input_ids"] == tokenizer(text, add_special_tokens=add)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == tokenizer.apply_chat_template(
        MESSAGES, tokenize=False
    )
    for attr in ("bos_token", "eos_token", "pad_token", "eos_token_id", "pad_token_id"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr)
    assert len(loaded) == len(tokenizer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="template='gemma'"):
        train_tokenizer(CORPUS, template="gemma")
    with pytest.raises(ValueError, match="vocab_size=200"):
        train_tokenizer(CORPUS, vocab_size=200)
