"""Loss masks under real chat templates (no generation markers): exactly the assistant tokens + end of turn."""

from __future__ import annotations

import numpy as np
import pytest

from align_jax.data.bpe import train_tokenizer
from align_jax.data.tokenize import TemplateError, chat_examples, tokenize_chat
from tests.data.conftest import CORPUS

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 17 plus 25?"},
    {"role": "assistant", "content": "17 plus 25 is 42."},
    {"role": "user", "content": "Reverse the word apple."},
    {"role": "assistant", "content": "apple reversed is elppa."},
]
ASSISTANT = [m["content"] for m in CHAT if m["role"] == "assistant"]
HEADER = {"<|im_end|>": "<|im_start|>assistant\n", "<|eot_id|>": "<|start_header_id|>assistant<|end_header_id|>\n\n"}


def spans(mask):
    """[start, end) runs of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_assistant_mask_is_exactly_each_reply_and_its_end_of_turn(tokenizer):
    ids, mask = tokenize_chat(tokenizer, CHAT, "assistant")
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape
    eot = tokenizer.eos_token_id
    runs = spans(mask)
    assert len(runs) == 2
    for (lo, hi), content in zip(runs, ASSISTANT, strict=True):
        # Independent of how the mask was found: the reply's own tokens, then the end-of-turn token.
        assert ids[lo:hi].tolist() == [*encode(tokenizer, content), eot]
        assert tokenizer.decode(ids[lo:hi]) == content + tokenizer.eos_token
        # Right before the reply: the assistant header, which is prompt, not target.
        assert tokenizer.decode(ids[:lo]).endswith(HEADER[tokenizer.eos_token])
    # Nothing else is a target: the unmasked text is the whole rendering minus the two replies.
    unmasked = tokenizer.decode(ids[mask == 0])
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    for content in ASSISTANT:
        full = full.replace(content + tokenizer.eos_token, "", 1)
    assert unmasked == full
    for m in CHAT[:2] + CHAT[3:4]:
        assert m["content"] in unmasked
    special = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_vocab() if t.startswith("<|")}
    assert set(ids[mask == 1].tolist()) & special == {eot}


def test_last_assistant_masks_only_the_final_reply(tokenizer):
    ids, mask = tokenize_chat(tokenizer, CHAT, "last_assistant")
    ((lo, hi),) = spans(mask)
    assert tokenizer.decode(ids[lo:hi]) == ASSISTANT[1] + tokenizer.eos_token
    full_ids, full_mask = tokenize_chat(tokenizer, CHAT, "assistant")
    assert np.array_equal(ids, full_ids) and np.array_equal(mask, full_mask * (np.arange(len(mask)) >= lo))


def test_all_masks_every_token(tokenizer):
    ids, mask = tokenize_chat(tokenizer, CHAT, "all")
    assert np.array_equal(ids, tokenize_chat(tokenizer, CHAT)[0])
    assert mask.tolist() == [1] * len(ids)


def test_llama3_template_trims_and_the_mask_follows_the_rendered_text(llama3):
    padded = [CHAT[1], {"role": "assistant", "content": "  17 plus 25 is 42.\n"}]
    ids, mask = tokenize_chat(llama3, padded)
    assert llama3.decode(ids[mask == 1]) == "17 plus 25 is 42.<|eot_id|>"
    assert ids[0] == llama3.bos_token_id and (ids == llama3.bos_token_id).sum() == 1  # no doubled BOS


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = train_tokenizer(CORPUS, vocab_size=320, template="chatml")
    # Marks only the final message: the text for messages[:2] is then not a prefix of the whole chat.
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if loop.last %}[final] {% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match=r"differently once the reply follows.*loss_on='per_turn'"):
        tokenize_chat(tok, CHAT)
    # Not even one turn at a time: its prompt and reply are not consistent either, which no mode fixes.
    with pytest.raises(TemplateError, match="does not start with the prompt"):
        chat_examples(tok, CHAT, "per_turn")


def test_tokens_merged_across_the_turn_boundary_are_refused():
    tok = train_tokenizer(CORPUS, vocab_size=320, template="chatml")
    # The generation prompt ends in a space that BPE merges into the reply's first word ("Ġthere" is not
    # "Ġ" + "there"), so the prompt's tokens are not a prefix of the chat's: the Llama 2 pitfall.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"}]
    prompt = encode(tok, tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True))
    whole = encode(tok, tok.apply_chat_template(chat, tokenize=False))
    assert whole[: len(prompt)] != prompt  # the premise: this template really breaks the prefix property
    with pytest.raises(TemplateError, match="merges across the turn boundary"):
        tokenize_chat(tok, chat)
    # With loss on every token no boundary is needed, so it still works.
    ids, mask = tokenize_chat(tok, chat, "all")
    assert ids.tolist() == whole and mask.all()


def test_bad_loss_on_and_missing_template():
    with pytest.raises(ValueError, match="loss_on='prompt'"):
        tokenize_chat(None, CHAT, "prompt")
    tok = train_tokenizer(CORPUS, vocab_size=320)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        tokenize_chat(tok, CHAT)
