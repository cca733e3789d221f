"""The environment interface and the calculator tool environment: the arithmetic parser (exact, no eval),
the episode logic and rewards, the demo problems, and how environment messages become template tokens."""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction

import pytest

from align_jax.data.bpe import train_tokenizer
from align_jax.data.formats import BadRowError
from align_jax.data.tokenize import TemplateError
from align_jax.env_rollout import ChatTemplate, env_token_ids
from align_jax.envs import DEMO_PROBLEMS, CalculatorEnv, env_factory
from align_jax.envs.base import StepResult, as_rendered, check_step, tool_role
from align_jax.envs.calculator import CalcError, answer_matches, evaluate, find_calls, format_number
from tests.data.chat_templates import make_tokenizer

CORPUS = ["What is 12 times 7?", "<calc>12*7</calc>", "12*7 = 84", "The answer is 84."] * 10


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("12*7", 84),
        (" 2 + 3 * 4 ", 14),
        ("(2+3)*4", 20),
        ("-3 - -2", -1),
        ("10/4", Fraction(5, 2)),
        ("1.5*4", 6),
        (".5+.25", Fraction(3, 4)),
        ("2*(3+(4-1))/3", 4),
    ],
)
def test_calculator_evaluates_exactly(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("1/0", "division by zero"),
        ("1/(2-2)", "division by zero"),
        ("__import__('os')", "names and functions are not supported"),
        ("abs(-2)", "names and functions are not supported"),
        ("2**3", "unexpected"),
        ("1+", "end of expression"),
        ("(1+2", "end of expression"),
        ("1+2)", "unexpected ')'"),
        ("3 4", "unexpected '4'"),
        ("", "empty expression"),
        ("1e5", "names"),
        ("(" * 40 + "1" + ")" * 40, "nested deeper"),
        ("1+" * 150 + "1", "longer than"),
    ],
)
def test_calculator_rejects_what_it_does_not_know_without_eval(expr, message):
    with pytest.raises(CalcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        evaluate(expr)


def test_numbers_and_answers():
    assert [format_number(Fraction(x)) for x in (84, Fraction(5, 2), Fraction(-1, 3), Fraction(2, 3))] == [
        "84",
        "2.5",
        "-0.333333",
        "0.666667",
    ]
    assert answer_matches("So the answer is 84.", "84") and answer_matches("84.0", "84")
    assert answer_matches("It is -7 degrees.", "-7") and answer_matches("1,200 seats", "1200")
    assert not answer_matches("84 or 85", "84") and not answer_matches("no idea", "84")
    assert not answer_matches("1845", "84") and answer_matches("Paris", "paris")
    assert find_calls("a <calc>1+2</calc> b <calc>3") == (["1+2"], 1)


def turn(messages, reply):
    return [*messages, {"role": "assistant", "content": reply}]


def test_calculator_episode_answers_calls_and_scores_the_final_answer():
    env = env_factory("calculator", max_turns=3)()
    chat = env.reset({"prompt": "What is 12 times 7?", "answer": "84"})
    assert [m["role"] for m in chat] == ["system", "user"] and "<calc>" in chat[0]["content"]
    chat = turn(chat, "Let me compute <calc>12*7</calc> and <calc>1/0</calc>")
    result = env.step(chat)
    assert result == StepResult([{"role": "tool", "content": "12*7 = 84\n1/0: error: division by zero"}], -0.1, False)
    chat = turn(chat + result.messages, "The answer is 84.")
    assert env.step(chat) == StepResult([], 1.0, True)
    # A row's own system message is kept, after the tool instructions; a wrong answer earns nothing.
    env = CalculatorEnv(tool_bonus=0.5, malformed_penalty=0.0)
    chat = env.reset(
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "answer": 3}
    )
    assert len(chat) == 2 and chat[0]["content"].endswith("\nBe brief.")
    assert env.step(turn(chat, "4")) == StepResult([], 0.0, True)
    # The bonus is paid once, for a right answer after a well-formed call.
    env.reset({"prompt": "q", "answer": "3"})
    chat = turn(chat, "<calc>1+2</calc>")
    chat = turn(chat + env.step(chat).messages, "3")
    assert env.step(chat) == StepResult([], 1.5, True)


def test_calculator_ends_at_max_turns_and_checks_rows():
    env = CalculatorEnv(max_turns=2)
    chat = env.reset({"prompt": "q", "answer": "1"})
    chat = turn(chat, "<calc>1")
    first = env.step(chat)
    assert not first.done and first.messages[0]["content"] == "error: <calc> without </calc>" and first.reward == -0.1
    last = env.step(turn(chat + first.messages, "<calc>1</calc>"))
    assert last == StepResult([], 0.0, True)  # still calling at the last turn: no answer
    with pytest.raises(BadRowError, match="answer"):
        env.reset({"prompt": "q"})
    with pytest.raises(ValueError, match="calculator"):
        env_factory("nope")
    assert check_step(([], 1, True), env) == StepResult([], 1.0, True)  # a plain tuple will do
    with pytest.raises(ValueError, match="role in"):
        check_step(StepResult([{"role": "assistant", "content": "x"}], 0.0, False), env)


def test_demo_problems_are_right_under_the_calculator():
    with open(DEMO_PROBLEMS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 50 and len({r["prompt"] for r in rows}) == 50
    for r in rows:
        assert format_number(evaluate(r["expression"])) == r["answer"], r
        assert CalculatorEnv().reset(r)[-1] == {"role": "user", "content": r["prompt"]}


@pytest.fixture(scope="module")
def chatml():
    return train_tokenizer(CORPUS, vocab_size=300, template="chatml")


def test_env_tokens_are_what_the_template_adds_after_the_reply(chatml):
    chat = ChatTemplate.of(chatml)
    assert chat.role == "tool"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<calc>12*7</calc>"}]
    ids = env_token_ids(chat, messages, [{"role": "tool", "content": "12*7 = 84"}])
    # ChatML's newline after <|im_end|>, the tool turn, then the next generation prompt.
    assert chatml.decode(ids) == "\n<|im_start|>tool\n12*7 = 84<|im_end|>\n<|im_start|>assistant\n"
    llama3 = ChatTemplate.of(train_tokenizer(CORPUS, vocab_size=300, template="llama3"))
    text = llama3.tokenizer.decode(env_token_ids(llama3, messages, [{"role": "user", "content": "more"}]))
    assert (
        text
        == "<|start_header_id|>user<|end_header_id|>\n\nmore<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_templates_without_a_tool_role_get_user_turns():
    qwen25 = make_tokenizer("qwen25", CORPUS)  # renders only system/user/assistant: a tool turn would vanish
    assert tool_role(qwen25) == "user"
    chat = ChatTemplate.of(qwen25)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = qwen25.decode(env_token_ids(chat, messages, [{"role": "tool", "content": "12*7 = 84"}]))
    assert text == "\n<|im_start|>user\n12*7 = 84<|im_end|>\n<|im_start|>assistant\n"
    assert tool_role(make_tokenizer("gemma2", CORPUS)) == "user"  # raises on roles that do not alternate


def test_a_template_that_rewrites_the_chat_is_a_clear_error():
    phi3 = ChatTemplate.of(make_tokenizer("phi3", CORPUS))  # ends a finished chat with eos, dropped later
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(TemplateError, match="renders the chat differently once the environment's messages"):
        env_token_ids(phi3, messages, [{"role": "user", "content": "more"}])


# An oracle apart from the generator: the expression each kind of demo word problem asks for.
ORACLE = (
    ("holds", lambda a, b: f"{a}*{b}"),
    ("rows of", lambda a, b: f"{a}*{b}"),
    ("more", lambda a, b: f"{a}+{b}"),
    ("gives away", lambda a, b: f"{a}-{b}"),
    ("shared equally", lambda a, b: f"{a}/{b}"),
    ("tickets at", lambda a, b, c: f"{a}*{b}+{c}"),
)


def solve(problem: str) -> str:
    (make,) = [f for key, f in ORACLE if key in problem]
    return format_number(evaluate(make(*re.findall(r"\d+", problem))))


def test_calculator_demo_files_are_reproduced_and_right(tmp_path):
    from align_jax.envs import make_calculator_data as gen

    for path in gen.write_files(str(tmp_path)):
        bundled = os.path.join(gen.DATA_DIR, os.path.basename(path))
        with open(path, "rb") as new, open(bundled, "rb") as old:
            assert new.read() == old.read(), f"{bundled} is stale: rerun python -m align_jax.envs.make_calculator_data"
    files = {name: [json.loads(line) for line in lines] for name, lines in gen.make_files().items()}
    for row in files["calculator_train"] + files["calculator_eval"]:
        assert solve(row["prompt"]) == format_number(evaluate(row["expression"])) == row["answer"], row
    train = {r["prompt"] for r in files["calculator_train"]} | {
        c["messages"][1]["content"] for c in files["calculator_sft"]
    }
    assert not train & {r["prompt"] for r in files["calculator_eval"]}
    chats = files["calculator_sft"] + files["calculator_sft_eval"]
    for chat in chats:
        # Replayed through the environment, each SFT chat is the episode RL would run (its tool message
        # as a user turn, as templates without a tool role render it) and it earns the full reward.
        msgs = chat["messages"]
        env = CalculatorEnv()
        episode = env.reset({"prompt": msgs[1]["content"], "answer": solve(msgs[1]["content"])})
        for reply in msgs[len(episode) :: 2]:
            result = env.step(turn(episode, reply["content"]))
            episode = turn(episode, reply["content"]) + result.messages
        assert result.done and result.reward == 1.0 and as_rendered(episode, "user") == msgs, msgs
    share = sum(len(c["messages"]) == 5 for c in chats) / len(chats)
    assert 0.3 < share < 0.7  # both tool-using and tool-free chats (see make_calculator_data)
