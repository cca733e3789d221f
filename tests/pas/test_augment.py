"""Augmentation: the join format, conversations, batching and caching, the GRPO hook, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from align_jax.pas import templates
from align_jax.pas.augment import Augmenter, augment_rows, register_grpo_augmenter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ScriptedPAS:
    """Complement = "C:" + prompt, except prompts containing "silent" (empty complement)."""

    def __init__(self):
        self.calls = []

    def generate(self, chats, **kw):
        self.calls.append((chats, kw))
        return ["  " if "silent" in c[-1]["content"] else f" C:{c[-1]['content']} " for c in chats]


def test_augment_format_and_empty_complement():
    model = ScriptedPAS()
    aug = Augmenter(model, max_new_tokens=12)
    assert aug.augment(["What is 1 plus 2?", "silent one"]) == [
        "What is 1 plus 2?\n\nC:What is 1 plus 2?",
        "silent one",
    ]
    chats, kw = model.calls[0]
    assert chats[0] == [
        {"role": "system", "content": templates.PAS_SYSTEM},
        {"role": "user", "content": "What is 1 plus 2?"},
    ]
    assert kw["max_new_tokens"] == 12 and kw["temperature"] == 0.0
    custom = Augmenter(ScriptedPAS(), template="{prompt} ({complement})")
    assert custom.augment(["q"]) == ["q (C:q)"]
    with pytest.raises(ValueError, match="needs both"):
        Augmenter(model, template="{prompt}")


def test_batches_and_cache():
    model = ScriptedPAS()
    aug = Augmenter(model, batch=3)
    prompts = [f"p{i}" for i in range(7)] + ["p0"]
    aug.complements(prompts)
    assert [len(chats) for chats, _ in model.calls] == [3, 3, 1]  # duplicates asked once
    assert aug.complements(["p3", "p1"]) == ["C:p3", "C:p1"] and len(model.calls) == 3  # cached
    sampled = Augmenter(ScriptedPAS(), temperature=0.8)
    sampled.complements(["a"])
    sampled.complements(["a"])
    assert len(sampled.model.calls) == 2  # sampled complements are drawn afresh
    assert sampled.model.calls[0][1]["seed"] != sampled.model.calls[1][1]["seed"]


def test_augment_messages_keeps_earlier_turns():
    aug = Augmenter(ScriptedPAS())
    chat = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    before = json.dumps(chat)
    out = aug.augment_messages(chat)
    assert out[:3] == chat[:3]
    assert out[3] == {"role": "user", "content": "second\n\nC:second"}
    assert json.dumps(chat) == before  # the input is not modified
    no_user = [{"role": "system", "content": "only a system prompt"}]
    assert aug.augment_conversations([no_user, chat[:2]]) == [
        no_user,
        [chat[0], {"role": "user", "content": "first\n\nC:first"}],
    ]


def test_grpo_hook():
    from align_jax.pas.augment import AUGMENTERS

    aug = Augmenter(ScriptedPAS())
    register_grpo_augmenter("pas-test", aug)
    try:
        hook = AUGMENTERS["pas-test"]
        assert hook([{"role": "user", "content": "q"}], {"prompt": "q"}) == [{"role": "user", "content": "q\n\nC:q"}]
        with pytest.raises(ValueError, match="already registered"):
            register_grpo_augmenter("pas-test", aug)
        register_grpo_augmenter("pas-test", Augmenter(ScriptedPAS(), template="{complement} {prompt}"), replace=True)
        assert AUGMENTERS["pas-test"]([{"role": "user", "content": "q"}], {})[0]["content"] == "C:q q"
    finally:
        AUGMENTERS.pop("pas-test", None)


def test_augment_rows():
    rows = [
        {"prompt": "a", "answer": "1"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]},
    ]
    out = augment_rows(Augmenter(ScriptedPAS()), rows)
    assert out[0] == {"prompt": "a", "answer": "1", "complement": "C:a", "augmented_prompt": "a\n\nC:a"}
    assert out[1]["augmented_prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "b\n\nC:b"}]
    with pytest.raises(ValueError, match="input row 0: no 'prompt'"):
        augment_rows(Augmenter(ScriptedPAS()), [{"text": "x"}])


def test_tiny_chat_model_augments_well_formed(tiny_chat):
    aug = Augmenter(tiny_chat, max_new_tokens=6)
    prompts = ["What is 41 plus 17?", "List three fruits.", "Reverse the word honey."]
    out = aug.augment(prompts)
    comps = aug.complements(prompts)
    for p, c, o in zip(prompts, comps, out, strict=True):
        assert isinstance(c, str) and c == c.strip()
        assert o == (p if not c else f"{p}\n\n{c}")
    assert aug.augment(prompts) == out  # greedy: the same again


def test_launch_augment(tiny_hf_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"prompt": "What is 2 plus 3?"})
        + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "augment.py"), "--pas", tiny_hf_dir, "--input", str(src)]
    cmd += ["--output", str(out), "--max_new_tokens", "4", "--batch_size", "2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["augmented_prompt", "complement", "prompt"]] * 2
    assert rows[0]["augmented_prompt"].startswith("What is 2 plus 3?")
    assert rows[1]["augmented_prompt"][0]["content"].startswith("hi")
