"""Raw rows -> canonical records: every format, and every kind of bad row named by file, row and field."""

from __future__ import annotations

import pytest

from align_jax.data.formats import BadRowError, Origin, detect_format, to_record

ORIGIN = Origin("data/train.jsonl", 7, "line")


def chat(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_messages_multi_turn_keeps_turns_and_drops_extra_keys():
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi", "name": "bob"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye."},
        ],
        "id": 3,
    }
    expected = chat(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Bye.")
    )
    assert to_record(row) == {"messages": expected}


def test_sharegpt_maps_speakers_and_top_level_system():
    row = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "user", "value": "And?"},
            {"from": "assistant", "value": "Done."},
        ],
    }
    expected = chat(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And?"), ("assistant", "Done.")
    )
    assert detect_format(row) == "sharegpt"
    assert to_record(row)["messages"] == expected
    inline_system = {"conversations": [{"from": "system", "value": "S"}, *row["conversations"][:2]]}
    assert to_record(inline_system)["messages"] == chat(("system", "S"), ("user", "Hi"), ("assistant", "Hello."))


def test_alpaca_joins_instruction_and_input_with_a_blank_line():
    with_input = {"instruction": "Sum these.", "input": "2 and 3", "output": "5"}
    assert to_record(with_input)["messages"] == chat(("user", "Sum these.\n\n2 and 3"), ("assistant", "5"))
    for empty in ({"input": ""}, {"input": None}, {}):
        row = {"instruction": "Say hi.", "output": "hi", **empty}
        assert to_record(row)["messages"] == chat(("user", "Say hi."), ("assistant", "hi"))
    with_system = {"system": "Be kind.", "instruction": "Say hi.", "output": "hi"}
    assert to_record(with_system)["messages"][0] == {"role": "system", "content": "Be kind."}


def test_prompt_completion_strings_and_message_lists():
    assert to_record({"prompt": "2+2?", "completion": "4"})["messages"] == chat(("user", "2+2?"), ("assistant", "4"))
    row = {
        "prompt": chat(("system", "S"), ("user", "2+2?")),
        "completion": chat(("assistant", "4")),
    }
    assert to_record(row)["messages"] == chat(("system", "S"), ("user", "2+2?"), ("assistant", "4"))


@pytest.mark.parametrize(
    "row, fmt",
    [
        ({"messages": chat(("user", "a"), ("assistant", "b"))}, "messages"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}, "sharegpt"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ],
)
def test_auto_detection_agrees_with_forced_format(row, fmt):
    assert detect_format(row) == fmt
    assert to_record(row, "auto") == to_record(row, fmt) == {"messages": chat(("user", "a"), ("assistant", "b"))}


OK_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
BAD_ROWS = [
    # (row, forced format, field named, words in the problem)
    pytest.param(
        {"messages": [{"role": "user"}, OK_TURNS[1]]}, "auto", "messages[0].content", "missing", id="missing-content"
    ),
    pytest.param({"instruction": "x"}, "alpaca", "output", "missing", id="missing-output"),
    pytest.param({"text": "x"}, "auto", None, "cannot tell the format", id="unknown-keys"),
    pytest.param({"messages": "hi"}, "auto", "messages", "expected a list, got str", id="wrong-type-list"),
    pytest.param(
        {"messages": [OK_TURNS[0], {"role": "assistant", "content": 5}]},
        "auto",
        "messages[1].content",
        "expected a string, got int",
        id="wrong-type-content",
    ),
    pytest.param(
        {"messages": [OK_TURNS[0], "hello"]}, "auto", "messages[1]", "expected an object", id="wrong-type-turn"
    ),
    pytest.param(
        {"messages": [{"role": "tool", "content": "x"}, *OK_TURNS]},
        "auto",
        "messages[0].role",
        "unknown role 'tool'",
        id="unknown-role",
    ),
    pytest.param(
        {"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "y"}]},
        "auto",
        "conversations[1].from",
        "unknown role",
        id="unknown-sharegpt-role",
    ),
    pytest.param(
        {"messages": [OK_TURNS[0], {"role": "assistant", "content": "  \n"}]},
        "auto",
        "messages[1]",
        "empty assistant turn",
        id="empty-assistant",
    ),
    pytest.param(
        {"instruction": "x", "output": ""}, "auto", "output", "empty assistant turn", id="empty-alpaca-output"
    ),
    pytest.param({"messages": [OK_TURNS[0]]}, "auto", "messages", "no assistant turn", id="no-assistant"),
    pytest.param(
        {"messages": [*OK_TURNS, {"role": "system", "content": "late"}]},
        "auto",
        "messages[2]",
        "only come first",
        id="late-system",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "bad \ud800 text"}, OK_TURNS[1]]},
        "auto",
        "messages[0].content",
        "undecodable",
        id="lone-surrogate",
    ),
    pytest.param(
        {"prompt": "fine", "completion": b"caf\xe9"}, "auto", "completion", "undecodable", id="invalid-utf8-bytes"
    ),
]


@pytest.mark.parametrize("row, fmt, field, problem", BAD_ROWS)
def test_bad_rows_name_file_row_and_field(row, fmt, field, problem):
    with pytest.raises(BadRowError) as info:
        to_record(row, fmt, ORIGIN)
    err = info.value
    assert (err.file, err.row, err.field) == ("data/train.jsonl", 7, field)
    message = str(err)
    assert "data/train.jsonl line 7" in message and problem in message
    if field is not None:
        assert repr(field) in message
    assert isinstance(err, ValueError)


def test_unknown_format_name_is_a_plain_error():
    with pytest.raises(ValueError, match="format='csv'"):
        to_record({"prompt": "a", "completion": "b"}, "csv")
