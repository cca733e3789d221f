"""IFEval's reader, its strict/loose read-out, the generation path with a scripted model, and the wiring
into evaluate_model, the eval stage's config and the report's metric names."""

from __future__ import annotations

import json

import ml_collections
import pytest

from align_jax.eval.ifeval import (
    DEFAULT_MAX_NEW_TOKENS,
    INSTRUCTIONS,
    evaluate_ifeval,
    load_ifeval,
    score_ifeval,
    write_responses,
)
from align_jax.eval.metric_names import describe, metric_order
from align_jax.eval.suite import evaluate_model

NO_COMMA, QUOTE = "punctuation:no_comma", "startend:quotation"


def _write(tmp_path, rows, name="ifeval.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _row(key=1, prompt="p", ids=(NO_COMMA,), kwargs=({},)):
    return {"key": key, "prompt": prompt, "instruction_id_list": list(ids), "kwargs": list(kwargs)}


# Reading ----------------------------------------------------------------------------------------------


def test_reads_the_official_shapes(tmp_path):
    hub_style = {  # the hub's export: every kwarg key on every row, None where unused; ints as floats
        "key": 1000,
        "prompt": "Write about snow.",
        "instruction_id_list": ["length_constraints:number_words", NO_COMMA],
        "kwargs": [
            {"num_words": 300.0, "relation": "at least", "keyword": None, "num_highlights": None},
            {"num_words": None, "relation": None},
        ],
        "extra": "ignored",
    }
    rows = load_ifeval(_write(tmp_path, [hub_style, _row(key=2)]))
    assert rows[0]["kwargs"] == [{"num_words": 300, "relation": "at least"}, {}]
    assert isinstance(rows[0]["kwargs"][0]["num_words"], int)
    assert [r["key"] for r in rows] == [1000, 2] and "extra" not in rows[0]
    assert len(load_ifeval(_write(tmp_path, [_row(), _row(key=2)]), limit=1)) == 1


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (_row(ids=["keywords:nope"]), "instruction_id_list[0]", "unknown instruction id 'keywords:nope'"),
        (_row(ids=[NO_COMMA, QUOTE], kwargs=[{}]), "kwargs", "expected a list of 2 objects, one per instruction id"),
        (_row(ids=["keywords:existence"]), "kwargs[0]", "keywords:existence needs ['keywords']"),
        (_row(kwargs=[{"keywords": ["x"]}]), "kwargs[0]", "punctuation:no_comma takes no arguments; got unknown"),
        (
            _row(ids=["length_constraints:number_words"], kwargs=[{"num_words": 5, "relation": "at most"}]),
            "kwargs[0].relation",
            "expected one of ['less than', 'at least']",
        ),
        (
            _row(
                ids=["keywords:letter_frequency"],
                kwargs=[{"letter": "ab", "let_frequency": 1, "let_relation": "at least"}],
            ),
            "kwargs[0].letter",
            "one ASCII letter",
        ),
        (
            _row(ids=["length_constraints:number_words"], kwargs=[{"num_words": -1, "relation": "at least"}]),
            "kwargs[0].num_words",
            "integer >= 0",
        ),
        ({"prompt": "p", "instruction_id_list": [NO_COMMA], "kwargs": [{}]}, "key", "missing"),
        (_row(prompt=" "), "prompt", "non-empty string"),
        (_row(ids=[], kwargs=[]), "instruction_id_list", "non-empty list"),
    ],
)
def test_reader_errors_name_file_line_and_field(tmp_path, row, field, message):
    path = _write(tmp_path, [_row(), row])
    with pytest.raises(ValueError) as err:
        load_ifeval(path)
    text = str(err.value)
    assert text.startswith(f"{path} line 2, field {field!r}: ") and message in text, text


def test_reader_rejects_bad_json_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r"line 1: not valid JSON"):
        load_ifeval(_write(tmp_path, ["{not json"]))
    with pytest.raises(ValueError, match="no prompts"):
        load_ifeval(_write(tmp_path, []))


def test_the_demo_set_covers_every_instruction():
    rows = load_ifeval("demo")
    assert 25 <= len(rows) <= 40
    assert {i for r in rows for i in r["instruction_id_list"]} == set(INSTRUCTIONS)
    assert len({r["key"] for r in rows}) == len(rows)


# Scoring ----------------------------------------------------------------------------------------------

HAND_ROWS = [
    _row(key=1, ids=[NO_COMMA, QUOTE], kwargs=[{}, {}]),
    _row(key=2, ids=[NO_COMMA], kwargs=[{}]),
    _row(key=3, ids=[QUOTE, NO_COMMA], kwargs=[{}, {}]),
]
HAND_RESPONSES = ['"Hi there"', "a, b", 'Sure\n"Yes"']


def test_the_read_out_on_a_hand_example():
    # Row 1 follows both; row 2 has a comma; row 3's quotation passes only loose (first line cut).
    got = score_ifeval(HAND_ROWS, HAND_RESPONSES)
    assert got["n_prompts"] == 3 and got["n_instructions"] == 5
    assert got["prompt_strict"] == pytest.approx(1 / 3) and got["inst_strict"] == pytest.approx(3 / 5)
    assert got["prompt_loose"] == pytest.approx(2 / 3) and got["inst_loose"] == pytest.approx(4 / 5)
    assert got["per_id"]["strict"] == {NO_COMMA: pytest.approx(2 / 3), QUOTE: 0.5}
    assert got["per_id"]["loose"] == {NO_COMMA: pytest.approx(2 / 3), QUOTE: 1.0}
    assert got["follow"][2] == {"strict": [False, True], "loose": [True, True]}
    with pytest.raises(ValueError, match="3 IFEval prompts but 2 responses"):
        score_ifeval(HAND_ROWS, HAND_RESPONSES[:2])


class Scripted:
    """A stand-in ChatModel: answers each prompt (keyed by its last user turn) from a table."""

    def __init__(self, answers):
        self.answers, self.seen, self.max_new_tokens = answers, [], []

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0):
        self.seen.extend(prompts)
        self.max_new_tokens.append(max_new_tokens)
        return [self.answers.get(p[-1]["content"], "") for p in prompts]


def _hand_file(tmp_path):
    rows = [dict(r, prompt=f"prompt {r['key']}") for r in HAND_ROWS]
    model = Scripted({f"prompt {r['key']}": resp for r, resp in zip(HAND_ROWS, HAND_RESPONSES, strict=True)})
    return _write(tmp_path, rows), model


def test_evaluate_ifeval_generates_long_and_scores(tmp_path):
    path, model = _hand_file(tmp_path)

    def augment(messages):
        return [{"role": "system", "content": "Follow the instructions."}, *messages]

    got = evaluate_ifeval(model, path, augment=augment)
    assert model.max_new_tokens == [DEFAULT_MAX_NEW_TOKENS] == [1280]
    assert all(p[0]["role"] == "system" and p[-1]["role"] == "user" for p in model.seen)
    assert got["prompt_strict"] == pytest.approx(1 / 3) and got["responses"] == HAND_RESPONSES
    out = tmp_path / "responses.jsonl"
    write_responses(str(out), got["rows"], got["responses"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"prompt": f"prompt {k}", "response": r} for k, r in zip((1, 2, 3), HAND_RESPONSES, strict=True)]


def test_evaluate_model_reports_ifeval_metrics(tmp_path):
    path, model = _hand_file(tmp_path)
    details: dict = {}
    metrics = evaluate_model(model, ifeval=path, ifeval_max_new_tokens=7, max_new_tokens=3, limit=2, details=details)
    assert model.max_new_tokens == [7]  # IFEval's own length, not the other evals' max_new_tokens
    assert metrics["ifeval/n_prompts"] == 2.0 and metrics["ifeval/n_instructions"] == 3.0
    assert metrics["ifeval/prompt_strict"] == 0.5 and metrics["ifeval/inst_loose"] == pytest.approx(2 / 3)
    assert metrics[f"ifeval/strict/{QUOTE}"] == 1.0 and metrics[f"ifeval/loose/{NO_COMMA}"] == 0.5
    assert len(details["ifeval/responses"]) == 2 and details["ifeval/rows"][0]["key"] == 1
    assert evaluate_model(model) == {}  # off unless asked for


def test_report_names_the_ifeval_metrics():
    assert describe("ifeval/prompt_strict").count == "ifeval/n_prompts"
    assert describe("ifeval/inst_loose").direction == 1 and describe("ifeval/n_instructions").kind == "count"
    per_id = describe(f"ifeval/strict/{QUOTE}")
    assert per_id.detail and QUOTE in per_id.name
    keys = [f"ifeval/loose/{QUOTE}", "ifeval/inst_loose", "ifeval/prompt_strict", "constraints/prompt_acc"]
    order = metric_order(keys)
    assert order.index("ifeval/inst_loose") < order.index(f"ifeval/loose/{QUOTE}")
    assert order.index("constraints/prompt_acc") < order.index("ifeval/prompt_strict")


# The eval stage's config ------------------------------------------------------------------------------


def _pipeline_eval(**keys):
    from align_jax.config import validate_pipeline

    c = ml_collections.ConfigDict()
    c.stages = "eval"
    c.eval = ml_collections.ConfigDict(
        {"max_new_tokens": 8, "seq_len": 16, "batch_size": 2, "dtype": "float32", **keys}
    )
    return validate_pipeline(c)


def test_the_eval_stage_reads_ifeval_settings(tmp_path):
    from align_jax.config import ConfigValueError
    from align_jax.stages.evaluation import _ifeval_path

    assert _ifeval_path(_pipeline_eval().eval) is None  # configs without the keys: off
    assert _ifeval_path(_pipeline_eval(ifeval="", ifeval_max_new_tokens=1280).eval) is None
    assert _ifeval_path(_pipeline_eval(ifeval="demo").eval) == "demo"
    assert _ifeval_path(_pipeline_eval(ifeval="demo:ifeval_demo").eval).endswith("eval/data/ifeval_demo.jsonl")
    with pytest.raises(ConfigValueError, match="no such file"):
        _pipeline_eval(ifeval=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigValueError, match="ifeval_max_new_tokens must be positive"):
        _pipeline_eval(ifeval="demo", ifeval_max_new_tokens=0)
