"""The complement loop with a scripted teacher and judge, the JSONL contract, SFT rows, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from align_jax.data.formats import to_record
from align_jax.pas import templates
from align_jax.pas.complement import COMPLEMENT_KEYS, check_complement_row, generate_complements, sft_rows, summarize
from align_jax.pas.jsonl import read_jsonl, read_prompts, write_jsonl
from align_jax.pas.judge import Verdict


class ScriptedTeacher:
    """Replies from a per-prompt script: the n-th call for a prompt gets script[prompt][n] (the last
    entry repeats). Records every call."""

    def __init__(self, script):
        self.script, self.calls, self.seen = script, [], {}

    def generate(self, chats, *, max_new_tokens, temperature, seed):
        self.calls.append({"n": len(chats), "temperature": temperature, "seed": seed, "chats": chats})
        out = []
        for chat in chats:
            prompt = chat[-1]["content"]
            k = self.seen.get(prompt, 0)
            self.seen[prompt] = k + 1
            replies = self.script[prompt]
            out.append(replies[min(k, len(replies) - 1)])
        return out


class ScriptedJudge:
    def __init__(self, verdicts):
        self.verdicts, self.items = verdicts, []

    def judge(self, items):
        self.items += items
        return [self.verdicts[it["complement"]] for it in items]


SCRIPT = {
    "p-good": ["good-1"],
    "p-second": ["bad-answers", "good-2"],
    "p-third": ["bad-intent", "bad-excess", "good-3"],
    "p-never": ["bad-answers", "bad-lang", "bad-intent", "good-late"],
}
VERDICTS = {
    "good-1": Verdict(True),
    "good-2": Verdict(True),
    "good-3": Verdict(True),
    "good-late": Verdict(True),
    "bad-answers": Verdict(False, templates.ANSWERS_PROMPT),
    "bad-intent": Verdict(False, templates.CHANGES_INTENT),
    "bad-excess": Verdict(False, templates.EXCESSIVE_DEMANDS),
    "bad-lang": Verdict(False, templates.WRONG_LANGUAGE),
}


def run_loop(max_attempts=3, batch=64):
    rows = [{"prompt": p, "category": "arithmetic" if p == "p-good" else "word"} for p in SCRIPT]
    rows[1]["answer"] = "42"
    teacher, judge = ScriptedTeacher(SCRIPT), ScriptedJudge(VERDICTS)
    out = generate_complements(
        rows, teacher, judge, max_attempts=max_attempts, seed=5, batch=batch, temperature=0.5, temperature_step=0.25
    )
    return out, teacher, judge


def test_regenerates_until_valid_within_max_attempts():
    out, teacher, judge = run_loop()
    assert [(r["prompt"], r["complement"], r["verdict"], r["reason"], r["attempts"]) for r in out] == [
        ("p-good", "good-1", "valid", "", 1),
        ("p-second", "good-2", "valid", "", 2),
        ("p-third", "good-3", "valid", "", 3),
        ("p-never", "bad-intent", "invalid", templates.CHANGES_INTENT, 3),  # max_attempts reached
    ]
    assert teacher.seen == {"p-good": 1, "p-second": 2, "p-third": 3, "p-never": 3}
    # Only the still-invalid rows go back; each retry is hotter and differently seeded.
    assert [c["n"] for c in teacher.calls] == [4, 3, 2]
    assert [c["temperature"] for c in teacher.calls] == [0.5, 0.75, 1.0]
    assert len({c["seed"] for c in teacher.calls}) == 3
    # The judge saw every attempt, with the row's answer when it had one.
    assert len(judge.items) == 9 and judge.items[1]["answer"] == "42" and "answer" not in judge.items[0]
    assert summarize(out) == {
        "rows": 4,
        "valid": 3,
        "invalid": 1,
        "attempts": {1: 1, 2: 1, 3: 2},
        "reasons": {templates.CHANGES_INTENT: 1},
    }


def test_more_attempts_and_small_batches():
    out, teacher, _ = run_loop(max_attempts=4, batch=2)
    assert [r["attempts"] for r in out] == [1, 2, 3, 4] and all(r["verdict"] == "valid" for r in out)
    assert [c["n"] for c in teacher.calls] == [2, 2, 2, 1, 2, 1]  # 4, 3, 2, 1 rows pending in batches of 2
    out, teacher, _ = run_loop(max_attempts=1)
    assert [r["attempts"] for r in out] == [1, 1, 1, 1] and [r["verdict"] for r in out] == ["valid"] + ["invalid"] * 3


def test_teacher_sees_few_shot_chat_of_the_category():
    _, teacher, _ = run_loop()
    chat = teacher.calls[0]["chats"][0]  # p-good, category arithmetic
    assert chat[0]["role"] == "system" and "(category: arithmetic)" in chat[0]["content"]
    shots = templates.FEW_SHOT["arithmetic"]
    assert [m["content"] for m in chat[1:-1]] == [x for pair in shots[:3] for x in pair]
    assert chat[-1] == {"role": "user", "content": "p-good"}
    other = templates.teacher_messages("q", "no-such-category", templates.FEW_SHOT, 1)
    assert [m["content"] for m in other[1:3]] == list(templates.FEW_SHOT["other"][0])


def test_jsonl_contract_and_sft_rows(tmp_path):
    out, _, _ = run_loop()
    path = str(tmp_path / "complements.jsonl")
    assert write_jsonl(path, out) == 4
    back = read_jsonl(path)
    assert back == out
    for i, row in enumerate(back):
        assert tuple(row) == COMPLEMENT_KEYS
        check_complement_row(row, f"row {i}")
        assert isinstance(row["attempts"], int) and row["verdict"] in ("valid", "invalid")
    sft = sft_rows(back)
    assert len(sft) == 3  # the invalid row is left out
    assert sft[1] == {
        "messages": [
            {"role": "system", "content": templates.PAS_SYSTEM},
            {"role": "user", "content": "p-second"},
            {"role": "assistant", "content": "good-2"},
        ]
    }
    for r in sft:  # what the sft stage will read
        assert to_record(r)["messages"][-1]["role"] == "assistant"
    with pytest.raises(ValueError, match=r"complement row 0, field 'verdict'"):
        sft_rows([{**out[0], "verdict": "ok"}])
    with pytest.raises(ValueError, match=r"complement row 1: keys"):
        sft_rows([out[0], {**out[1], "extra": 1}])


def test_bad_input_rows_are_named():
    with pytest.raises(ValueError, match=r"row 1, field 'prompt'"):
        generate_complements([{"prompt": "a"}, {"prompt": ""}], ScriptedTeacher({}), ScriptedJudge({}))
    with pytest.raises(ValueError, match="teacher returned 0 replies for 1"):

        class Mute:
            def generate(self, chats, **kw):
                return []

        generate_complements([{"prompt": "a"}], Mute(), ScriptedJudge({}))


def test_write_jsonl_is_atomic(tmp_path):
    path = str(tmp_path / "out.jsonl")
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("dies mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"a": 1}]  # the old file is intact
    assert os.listdir(tmp_path) == ["out.jsonl"]  # and no temporary file is left behind


def test_read_prompts_shapes_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a"},
    ]
    chat += [{"role": "user", "content": "u2"}]
    lines = [{"prompt": "plain"}, {"prompt": chat}, {"messages": chat}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_prompts(str(path)) == ["plain", "u1", "u1"]
    assert read_prompts(str(path), turn="last") == ["plain", "u2", "u2"]
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl line 2: no 'prompt' field"):
        read_prompts(str(path))
    path.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"line 1, field 'prompt': no user turn"):
        read_prompts(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"line 1: not valid JSON"):
        read_jsonl(str(path))
