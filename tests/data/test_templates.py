"""Loss masks under the chat templates of seven real model families (tests/data/chat_templates.py): each
assistant reply and the token that closes it are the targets, exactly, in single- and multi-turn chats,
with and without a system message; what cannot be trained says why and what works instead."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest

from align_jax.config import base_config, sections
from align_jax.data import tokenize
from align_jax.data.formats import BadRowError
from align_jax.data.pipeline import make_sft_iterator
from align_jax.data.tokenize import TemplateError, TemplateRejected, chat_examples, tokenize_chat
from tests.data.chat_templates import END_OF_TURN, FAMILIES, make_tokenizer
from tests.data.conftest import CORPUS

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q1, Q2 = {"role": "user", "content": "What is 17 plus 25?"}, {"role": "user", "content": "Reverse the word apple."}
A1 = {"role": "assistant", "content": "17 plus 25 is 42."}
A2 = {"role": "assistant", "content": "apple reversed is elppa."}
THINK = {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n17 plus 25 is 42."}
CHATS = {
    "single": [Q1, A1],
    "single_system": [SYSTEM, Q1, A1],
    "multi": [Q1, A1, Q2, A2],
    "multi_system": [SYSTEM, Q1, A1, Q2, A2],
    "multi_reasoning": [SYSTEM, Q1, THINK, Q2, A2],
}
# The (family, chat) pairs a template does not render as growing prefixes: `auto` trains them per turn.
PER_TURN = {
    ("qwen3", "multi"),  # the final reply gets a think block, earlier ones lose theirs
    ("qwen3", "multi_system"),
    ("qwen3", "multi_reasoning"),
    ("mistral", "single_system"),  # the system message goes only into a final user turn
    ("mistral", "multi_system"),
    ("mistral", "multi_reasoning"),
    ("phi3", "multi"),  # eos after the final turn
    ("phi3", "multi_system"),
    ("phi3", "multi_reasoning"),
}
# Every family and chat but Gemma 2's with a system message (its template refuses those: see below).
CASES = [(f, c) for f in FAMILIES for c in CHATS if not (f == "gemma2" and c != "single" and c != "multi")]


@pytest.fixture(scope="module")
def tokenizers():
    return {family: make_tokenizer(family, CORPUS) for family in FAMILIES}


def reply(family, content):
    """The text the model writes for `content` as the final turn of its sample, closing token included."""
    eot = END_OF_TURN[family]
    if family in ("llama31", "gemma2", "gemma3"):
        return content.strip() + eot
    if family == "mistral":
        return " " + content.strip() + eot
    if family == "qwen3":  # the final reply always carries its (possibly empty) reasoning block
        thought, _, answer = content.rpartition("</think>")
        thought = thought.split("<think>")[-1].strip("\n")
        return f"<think>\n{thought}\n</think>\n\n{answer.lstrip(chr(10))}{eot}"
    return content + eot


def runs(tok, ids, mask):
    """The decoded text of each run of target tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [tok.decode(ids[lo:hi]) for lo, hi in zip(edges[::2], edges[1::2], strict=True)]


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("family", "chat"), CASES)
def test_auto_masks_exactly_each_reply_and_its_end_of_turn(tokenizers, family, chat):
    tok, messages = tokenizers[family], CHATS[chat]
    examples, fallback = chat_examples(tok, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if (family, chat) not in PER_TURN:
        # One sample, the template's own rendering of the whole chat, every reply a target.
        assert fallback is None and len(examples) == 1
        ((ids, mask),) = examples
        assert ids.tolist() == encode(tok, tok.apply_chat_template(messages, tokenize=False))
        assert runs(tok, ids, mask) == [reply(family, messages[i]["content"]) for i in turns]
        return
    assert "differently" in fallback and len(examples) == len(turns)
    for i, (ids, mask) in zip(turns, examples, strict=True):
        # Each turn as the model sees it at inference: the prompt the template writes before it, then the reply.
        prompt = encode(tok, tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        assert ids[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
        assert runs(tok, ids, mask) == [reply(family, messages[i]["content"])]


@pytest.mark.parametrize(("family", "chat"), CASES)
def test_assistant_mode_matches_auto_or_names_the_option_that_works(tokenizers, family, chat):
    tok, messages = tokenizers[family], CHATS[chat]
    if (family, chat) in PER_TURN:
        with pytest.raises(TemplateError, match=r"differently.*data.loss_on='per_turn' \(or 'auto'"):
            tokenize_chat(tok, messages, "assistant")
        return
    ids, mask = tokenize_chat(tok, messages, "assistant")
    ((auto_ids, auto_mask),), _ = chat_examples(tok, messages, "auto")
    assert np.array_equal(ids, auto_ids) and np.array_equal(mask, auto_mask)


@pytest.mark.parametrize(("family", "chat"), CASES)
def test_per_turn_and_last_assistant_are_the_inference_view(tokenizers, family, chat):
    tok, messages = tokenizers[family], CHATS[chat]
    per_turn, _ = chat_examples(tok, messages, "per_turn")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert [runs(tok, *x) for x in per_turn] == [[reply(family, messages[i]["content"])] for i in turns]
    last_ids, last_mask = tokenize_chat(tok, messages, "last_assistant")
    assert np.array_equal(last_ids, per_turn[-1][0]) and np.array_equal(last_mask, per_turn[-1][1])


def test_phi3_eos_after_the_final_turn_is_not_a_target(tokenizers):
    tok = tokenizers["phi3"]
    ids, mask = tokenize_chat(tok, [Q1, A1])
    end, eos = tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id
    # The template writes `<|end|>\n<|endoftext|>` after the reply; generation stops at <|end|>.
    assert ids[-1] == eos and tok.decode(ids[-3:]) == "<|end|>\n<|endoftext|>"
    last = int(np.flatnonzero(mask)[-1])
    assert ids[last] == end and not mask[last + 1 :].any()


def test_a_reply_quoting_an_end_of_turn_token_stays_whole(tokenizers):
    tok = tokenizers["qwen25"]
    quoting = {"role": "assistant", "content": "ChatML ends a turn with <|im_end|> and goes on."}
    ids, mask = tokenize_chat(tok, [Q1, quoting])
    assert runs(tok, ids, mask) == [quoting["content"] + "<|im_end|>"]


def test_qwen3_trains_each_turn_with_the_history_it_sees_at_inference(tokenizers):
    tok = tokenizers["qwen3"]
    (first, first_mask), (second, second_mask) = chat_examples(tok, CHATS["multi_reasoning"])[0]
    assert runs(tok, first, first_mask) == ["<think>\nAdd them.\n</think>\n\n17 plus 25 is 42.<|im_end|>"]
    # By the second turn the template has dropped the first turn's reasoning from the history.
    history = tok.decode(second[second_mask == 0])
    assert "17 plus 25 is 42." in history and "Add them" not in history


def test_mistral_system_message_is_in_every_turns_prompt(tokenizers):
    tok, messages = tokenizers["mistral"], CHATS["multi_system"]
    examples, _ = chat_examples(tok, messages)
    for i, (ids, mask) in zip((2, 4), examples, strict=True):
        prompt = tok.decode(ids[: np.flatnonzero(mask)[0]])
        # Where Mistral's template puts it at inference: in the user turn right before the reply, once.
        assert prompt.endswith(f"[INST] {SYSTEM['content']}\n\n{messages[i - 1]['content']}[/INST]")
        assert prompt.count(SYSTEM["content"]) == 1


def test_gemma2_system_message_is_a_rejected_chat_with_a_remedy(tokenizers):
    with pytest.raises(
        TemplateRejected,
        match=r"System role not supported.*fold the system text into the first user.*on_bad_row='skip'",
    ):
        chat_examples(tokenizers["gemma2"], CHATS["single_system"])
    # Gemma 3 folds it into the first user turn instead: trained as one sample.
    ((ids, _),), fallback = chat_examples(tokenizers["gemma3"], CHATS["multi_system"])
    assert fallback is None and "You are a helpful assistant.\n\nWhat is 17" in tokenizers["gemma3"].decode(ids)


def write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return str(path)


def test_loader_counts_a_chat_the_template_rejects_as_a_bad_row(tokenizers, tmp_path):
    path = write_jsonl(tmp_path / "gemma.jsonl", [CHATS["single"], CHATS["single_system"], CHATS["multi"]])
    cfg = {"eval": path, "seq_len": 128, "batch_size": 2}
    with pytest.raises(BadRowError, match="System role not supported") as info:
        list(make_sft_iterator(cfg, tokenizers["gemma2"], "eval", process_index=0, process_count=1))
    assert (info.value.file, info.value.row, info.value.field) == (path, 2, "messages")
    batches = make_sft_iterator({**cfg, "on_bad_row": "skip"}, tokenizers["gemma2"], "eval", 0, 1)
    list(batches)
    assert batches.stats()["bad_rows"] == 1 and batches.stats()["examples"] == 2


def test_pair_loader_counts_a_pair_the_template_rejects_as_a_bad_row(tokenizers, tmp_path):
    from align_jax.data.preference import PreferenceDataConfig, make_preference_iterator

    def pair(system):
        prompt = ([{"role": "system", "content": "Be brief."}] if system else []) + [{"role": "user", "content": "Hi"}]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello."}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}  # fmt: skip

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair(s)) + "\n" for s in (False, True, False)))
    cfg = PreferenceDataConfig(train=str(path), eval=str(path), seq_len=128, batch_size=2)
    with pytest.raises(BadRowError, match="System role not supported") as info:
        list(make_preference_iterator(cfg, tokenizers["gemma2"], "eval", process_index=0, process_count=1))
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 2, "prompt")
    batches = make_preference_iterator(
        dataclasses.replace(cfg, on_bad_row="skip"), tokenizers["gemma2"], "eval", process_index=0, process_count=1
    )
    assert sum(int(b["pair_mask"].sum()) for b in batches) == 2
    assert batches.stats()["bad_rows"] == 1


def test_loader_trains_qwen3_multi_turn_chats_per_turn_and_says_why_once(tokenizers, tmp_path, caplog):
    tok = tokenizers["qwen3"]
    chats = [CHATS["single"], CHATS["multi_reasoning"], CHATS["multi"], CHATS["single_system"]]
    path = write_jsonl(tmp_path / "qwen3.jsonl", chats)
    batches = make_sft_iterator({"eval": path, "seq_len": 128, "batch_size": 2}, tok, "eval", 0, 1)
    with caplog.at_level(logging.INFO, logger="align_jax.data.sft_loader"):
        rows = list(batches)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "data.loss_on='auto'" in logged[0] and f"{path} line 2" in logged[0]
    assert batches.stats()["examples"] == 1 + 2 + 2 + 1  # the multi-turn chats give one sample per turn
    want = sorted(t for c in chats for t in (reply("qwen3", m["content"]) for m in c if m["role"] == "assistant"))
    got = sorted(
        t for b in rows for ids, mask in zip(b["tokens"], b["loss_mask"], strict=True) for t in runs(tok, ids, mask)
    )
    assert got == want
    # Asked for the whole chat as one sample, the loader names the row and the option that works.
    with pytest.raises(TemplateError, match=rf"{path} line 2: .*data.loss_on='per_turn'"):
        list(make_sft_iterator({"eval": path, "seq_len": 128, "loss_on": "assistant"}, tok, "eval", 0, 1))


GENERATION_TEMPLATES = {
    "qwen25": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
        "{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama31": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
        "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
    ),
}


@pytest.mark.parametrize("family", sorted(GENERATION_TEMPLATES))
@pytest.mark.parametrize("chat", ["single_system", "multi_system"])
def test_mask_matches_transformers_generation_blocks(family, chat):
    tok = make_tokenizer(family, CORPUS)
    tok.chat_template = GENERATION_TEMPLATES[family]
    messages = CHATS[chat]
    hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    (examples, _) = chat_examples(tok, messages, "auto")
    if len(examples) == 1:
        ((ids, mask),) = examples
        assert ids.tolist() == hf["input_ids"] and mask.tolist() == hf["assistant_masks"]
    else:
        # Phi-3's eos after the final turn: each turn is its own sample; each must match transformers'
        # mask of that turn's own chat, which ends with it.
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i, (ids, mask) in zip(turns, examples, strict=True):
            own = tok.apply_chat_template(messages[: i + 1], return_dict=True, return_assistant_tokens_mask=True)
            last = np.flatnonzero(np.diff(np.concatenate([[0], own["assistant_masks"]])) == 1)[-1]
            want = [m if k >= last else 0 for k, m in enumerate(own["assistant_masks"])]
            assert ids.tolist() == own["input_ids"] and mask.tolist() == want


def test_config_offers_the_same_modes_and_defaults_to_auto(tokenizers):
    assert sections.LOSS_ON == tokenize.LOSS_ON
    config = base_config("sft")
    assert config.data.loss_on == "auto"
    config.data.train = "x.jsonl"
    for mode in tokenize.LOSS_ON:
        config.data.loss_on = mode
        sections.validate_data(config)
    config.data.loss_on = "assistant_only"
    with pytest.raises(sections.ConfigValueError, match=r"data\.loss_on"):
        sections.validate_data(config)
