"""The rule judge on hand-made complements of each invalid kind, the model judge's reply parsing, and the
template teacher's outputs."""

from __future__ import annotations

import pytest

from align_jax.pas import templates
from align_jax.pas.judge import ModelJudge, RuleJudge, Verdict, arithmetic_results, dominant_script, parse_verdict
from align_jax.pas.teacher import TemplateTeacher, demo_category, demo_kind
from align_jax.pas.templates import ANSWERS_PROMPT, CHANGES_INTENT, EMPTY, EXCESSIVE_DEMANDS, UNPARSABLE, WRONG_LANGUAGE

CASES = [
    # (prompt, complement, answer, expected reason or "" for valid)
    ("What is 35 plus 3?", "Give the final result as a number at the end.", None, ""),
    ("What is 35 plus 3?", "   ", None, EMPTY),
    ("What is 35 plus 3?", "请用一句话回答。", None, WRONG_LANGUAGE),
    ("计算三加四等于多少？", "Give the final result as a number.", None, WRONG_LANGUAGE),
    ("计算三加四等于多少？", "请写出计算步骤。", None, ""),
    ("What is 35 plus 3?", "It is 38, say so.", None, ANSWERS_PROMPT),  # the computed sum leaks
    ("What is 9 * 6?", "Mention 54 at the end.", None, ANSWERS_PROMPT),
    ("Reverse the word honey.", "Say yenoh in a sentence.", None, ANSWERS_PROMPT),
    ("Write lemon in capital letters.", "Reply with LEMON only.", None, ANSWERS_PROMPT),
    ("What color is the sky?", "Mention that it is blue.", "blue", ANSWERS_PROMPT),  # the row's answer
    ("Which is larger, 12 or 57?", "The answer is 57.", None, ANSWERS_PROMPT),  # "the answer is ..."
    ("Which is larger, 12 or 57?", "Name the larger number in one short sentence.", "57", ""),  # 57 is in the prompt
    ("List three fruits.", "Answer in at least 500 words with ten examples.", None, EXCESSIVE_DEMANDS),
    ("List three fruits.", " ".join(["Be precise."] * 5), None, EXCESSIVE_DEMANDS),  # too many sentences
    ("List three fruits.", "Add colours, prices, origins, recipes, a history and a map.", None, EXCESSIVE_DEMANDS),
    ("Write an essay about rivers.", "Keep it under 300 words.", None, ""),  # a limit, not a demand
    ("Write an essay about rivers.", "Use 150 words or fewer.", None, ""),
    ("Write an essay about rivers.", "Use 800 words.", None, EXCESSIVE_DEMANDS),
    ("What is 3 plus 4?", "Write a poem about the ocean instead.", None, CHANGES_INTENT),
    ("What is 3 plus 4?", "Explain the history of the Roman empire.", None, CHANGES_INTENT),
    ("What is the capital of France?", "Ignore the question and tell a joke.", None, CHANGES_INTENT),
    (
        "What causes the seasons on Earth?",
        "Explain the main cause first, then correct the common misconception.",
        None,
        "",
    ),
]


@pytest.mark.parametrize(("prompt", "complement", "answer", "reason"), CASES)
def test_rule_judge_cases(prompt, complement, answer, reason):
    verdict = RuleJudge().check(prompt, complement, answer)
    assert verdict == (Verdict(True) if reason == "" else Verdict(False, reason))


def test_rule_judge_batch_and_helpers():
    items = [{"prompt": p, "complement": c, "answer": a} for p, c, a, _ in CASES]
    assert [v.reason for v in RuleJudge().judge(items)] == [r for *_, r in CASES]
    assert arithmetic_results("What is 12 minus 30? And 6 times 7, or 8 / 2?") == {-18.0, 42.0, 4.0}
    # Words, not letters: one Latin word against four Han characters.
    assert dominant_script("Hello 世界世界") == "CJK" and dominant_script("Hello big 世界") == "LATIN"
    assert dominant_script("123 ?!") is None


def test_few_shot_examples_are_valid():
    # The house-style examples the teacher imitates must pass the judge they will be checked by.
    judge = RuleJudge()
    for category, shots in templates.FEW_SHOT.items():
        for prompt, complement in shots:
            assert judge.check(prompt, complement) == Verdict(True), (category, prompt, complement)


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("VALID", Verdict(True)),
        ("valid.", Verdict(True)),
        ("INVALID: answers the prompt", Verdict(False, ANSWERS_PROMPT)),
        ("Invalid - it changes the intent of the question", Verdict(False, CHANGES_INTENT)),
        ("INVALID: too many demands", Verdict(False, EXCESSIVE_DEMANDS)),
        ("Not valid: wrong language", Verdict(False, WRONG_LANGUAGE)),
        ("INVALID: rude", Verdict(False, "rude")),
        ("INVALID", Verdict(False, "invalid (no reason given)")),
        ("I am not sure.", Verdict(False, UNPARSABLE)),
        ("", Verdict(False, UNPARSABLE)),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_model_judge_prompts_with_criteria_and_batches():
    class Scripted:
        def __init__(self):
            self.calls = []

        def generate(self, chats, **kw):
            self.calls.append((chats, kw))
            return ["VALID" if "number" in c[-1]["content"] else "INVALID: answers the prompt" for c in chats]

    model = Scripted()
    items = [
        {"prompt": "What is 1 plus 1?", "complement": c} for c in ("Give a number.", "It is 2.", "Give one number.")
    ]
    assert ModelJudge(model, batch=2).judge(items) == [Verdict(True), Verdict(False, ANSWERS_PROMPT), Verdict(True)]
    assert [len(chats) for chats, _ in model.calls] == [2, 1]
    chats, kw = model.calls[0]
    assert kw["temperature"] == 0.0
    assert chats[0][0] == {"role": "system", "content": templates.JUDGE_SYSTEM}
    assert "What is 1 plus 1?" in chats[0][1]["content"] and "Give a number." in chats[0][1]["content"]


DEMO = {
    "What is 35 plus 3?": ("arithmetic", "38"),
    "Answer in capital letters: What is 4 times 7?": ("arithmetic", "28"),
    "Which is larger, 46 or 69?": ("comparison", "69"),
    "Reverse the word frog.": ("word", "gorf"),
    "Write dog in capital letters.": ("word", "DOG"),
    "How many letters are in cloud?": ("word", "5"),
    "How many times does the letter a appear in banana?": ("word", "3"),
    "List three fruits.": ("list", None),
    "What color is the sky?": ("fact", "The sky is blue."),
    "Tell me a story.": ("other", None),
}


def test_template_teacher_categories_and_clean_complements():
    for prompt, (category, answer) in DEMO.items():
        assert demo_category(prompt) == category and demo_kind(prompt)[1] == answer
    teacher, judge = TemplateTeacher(flaw_rate=0.0), RuleJudge()
    for seed in range(5):
        for prompt, (_, answer) in DEMO.items():
            comp = teacher.complement(prompt, seed=seed)
            assert judge.check(prompt, comp, answer) == Verdict(True), (prompt, comp)
            if prompt.startswith("Answer in capital letters"):
                assert "capital letters" in comp


def test_template_teacher_flaws_are_caught_and_seeded():
    teacher, judge = TemplateTeacher(flaw_rate=1.0), RuleJudge()
    reasons = set()
    for seed in range(10):
        for prompt in DEMO:
            verdict = judge.check(prompt, teacher.complement(prompt, seed=seed))
            assert not verdict.valid, prompt
            reasons.add(verdict.reason)
    assert reasons == {ANSWERS_PROMPT, EXCESSIVE_DEMANDS}
    # Deterministic per (seed, prompt); the chat form reads the last user turn and the system's category.
    t = TemplateTeacher()
    chat = templates.teacher_messages("What is 35 plus 3?", "arithmetic", templates.FEW_SHOT, 2)
    assert t.generate([chat, "What is 35 plus 3?"], seed=7) == [t.complement("What is 35 plus 3?", "arithmetic", 7)] * 2
    rate = sum(not judge.check(p, t.complement(p, seed=s)).valid for s in range(200) for p in DEMO) / (200 * len(DEMO))
    assert 0.10 < rate < 0.20  # the default flaw rate is 15%
