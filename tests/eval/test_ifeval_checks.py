"""IFEval's 25 instruction checks against hand-made responses that pass and fail, and the text units."""

from __future__ import annotations

import pytest

from align_jax.eval.ifeval import follows
from align_jax.eval.ifeval_checks import INSTRUCTIONS
from align_jax.eval.ifeval_text import count_sentences, count_words, word_tokens

SNOW = "Write one sentence about snow."
LT, AL = "less than", "at least"

# (instruction id, kwargs, response, strict result)
CASES = [
    ("keywords:existence", {"keywords": ["cloud", "umbrella"]}, "A CLOUD came; I took my umbrella.", True),
    ("keywords:existence", {"keywords": ["cloud", "umbrella"]}, "A cloud came.", False),
    ("keywords:existence", {"keywords": ["cat"]}, "A category.", True),  # substrings count, as officially
    ("keywords:frequency", {"keyword": "sweet", "frequency": 2, "relation": AL}, "Sweet and sweeter.", True),
    ("keywords:frequency", {"keyword": "sweet", "frequency": 2, "relation": AL}, "It is sweet.", False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": LT}, "One cat.", True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": LT}, "cat and Cat", False),
    ("keywords:forbidden_words", {"forbidden_words": ["sun", "hot"]}, "Sunny and hotter.", True),  # whole words
    ("keywords:forbidden_words", {"forbidden_words": ["sun", "hot"]}, "The Sun rose.", False),
    ("keywords:letter_frequency", {"letter": "r", "let_frequency": 3, "let_relation": AL}, "Red rover runs", True),
    ("keywords:letter_frequency", {"letter": "r", "let_frequency": 3, "let_relation": AL}, "Red door", False),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": LT}, "Blue, a zen hue.", True),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": LT}, "Zebra zone", False),
    (
        "language:response_language",
        {"language": "fr"},
        "Bonjour, je suis un assistant très heureux de vous aider.",
        True,
    ),
    ("language:response_language", {"language": "fr"}, "Hello, I am an assistant and I am happy to help you.", False),
    ("language:response_language", {"language": "fr"}, "12345 !!", True),  # undetectable counts as followed
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "One. Two.", True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": LT}, "One. Two! Three?", False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "Hi there. Bye now.", True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": AL}, "Mr. Smith left.", False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "*** A *** B ***", True),  # empty ends
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n\n***\nB", False),  # empty middle
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One part only.", False),
    ("length_constraints:number_words", {"num_words": 5, "relation": LT}, "one two three four", True),
    ("length_constraints:number_words", {"num_words": 5, "relation": LT}, "one two, don't four", False),  # don, t
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "one two three", True),
    ("length_constraints:number_words", {"num_words": 3, "relation": AL}, "one two", False),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "green"},
        'Tea is old.\n\n"Green, tea is good."',
        True,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "green"},
        "Tea is old.\n\nBlack tea is strong.",
        False,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "green"},
        "Tea.\n\nGreen tea.\n\nMore tea.",  # the right word, but three paragraphs
        False,
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address]:", True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name],", False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Sleep early.\nP.S. Drink water.", True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Sleep early. PS drink water.", False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Study.\np. p. s see you", True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Study.\nP.S. see you", False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n- c", True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n* b\n**bold** c", False),  # ** is bold
    ("detectable_format:constrained_response", {}, "I checked. My answer is yes.", True),
    ("detectable_format:constrained_response", {}, "Yes.", False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**only one** and * *", False),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nSun\nSECTION 2\nSea",
        True,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "Section 1\nSun\nSection 2\nSea",
        False,
    ),
    ("detectable_format:json_format", {}, '```json\n{"apple": "red"}\n```', True),
    ("detectable_format:json_format", {}, 'Here: {"apple": "red"}', False),
    ("detectable_format:title", {}, "<<Moon Song>>\nThe moon is bright.", True),
    ("detectable_format:title", {}, "<< >>\nMoon Song", False),
    ("combination:two_responses", {}, "Rex\n******\nMax", True),
    ("combination:two_responses", {}, "Rex\n******\nRex", False),  # the two must differ
    ("combination:two_responses", {}, "Rex\n******\n******\nMax", False),  # an empty one between
    ("combination:repeat_prompt", {"prompt_to_repeat": SNOW}, "write one sentence about snow. Snow is cold.", True),
    ("combination:repeat_prompt", {"prompt_to_repeat": SNOW}, "Sure! Write one sentence about snow.", False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Boil it. Any other questions?"', True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False),
    ("startend:quotation", {}, '"Friends matter."', True),
    ("startend:quotation", {}, 'Friends "matter"', False),
    ("startend:quotation", {}, '"', False),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": AL},
        "WARNING: ICE ahead",
        True,
    ),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": AL}, "Warning: ice", False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT}, "A calm lake", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": LT}, "I DON'T know", False),
    ("change_case:english_capital", {}, "THE SHOP IS OPEN NOW FOR EVERYONE IN TOWN.", True),
    ("change_case:english_capital", {}, "The shop is open now for everyone in town.", False),
    ("change_case:english_capital", {}, "МАГАЗИН ОТКРЫТ СЕГОДНЯ ДЛЯ ВСЕХ.", False),
    ("change_case:english_lowercase", {}, "the evening is quiet and the birds are asleep.", True),
    ("change_case:english_lowercase", {}, "The evening is quiet and the birds are asleep.", False),
    ("change_case:english_lowercase", {}, "la soirée est calme et les oiseaux dorment déjà.", False),
    ("punctuation:no_comma", {}, "No commas here.", True),
    ("punctuation:no_comma", {}, "One, two.", False),
    ("punctuation:no_comma", {}, "一，二", True),  # ASCII commas only, as officially
]

# (instruction id, kwargs, response): fails strict, passes loose (a cut first/last line or removed "*").
LOOSE_ONLY = [
    ("startend:quotation", {}, 'Sure, here it is:\n"Kindness matters."'),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Boil it. Any other questions?\nHope it helps!"),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
    ("combination:repeat_prompt", {"prompt_to_repeat": SNOW}, f"**{SNOW}** Snow is white."),
    ("change_case:english_lowercase", {}, "Sure!\nthe lake is calm and quiet today."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* Mars\n* Venus\n- ask me more"),
    ("length_constraints:number_words", {"num_words": 5, "relation": LT}, "Here you go:\none two three\nHope it helps"),
]


def _row(instruction_id: str, kwargs: dict) -> dict:
    return {"prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}


def test_the_registry_has_the_25_official_ids():
    assert len(INSTRUCTIONS) == 25
    assert {i.split(":")[0] for i in INSTRUCTIONS} == {
        "keywords",
        "language",
        "length_constraints",
        "detectable_content",
        "detectable_format",
        "combination",
        "startend",
        "change_case",
        "punctuation",
    }


def test_every_id_has_a_passing_and_a_failing_case():
    covered = {(i, expected) for i, _, _, expected in CASES}
    assert covered == {(i, e) for i in INSTRUCTIONS for e in (True, False)}


@pytest.mark.parametrize(("instruction_id", "kwargs", "response", "expected"), CASES)
def test_strict(instruction_id, kwargs, response, expected):
    assert INSTRUCTIONS[instruction_id].fn(response, **kwargs) is expected
    assert follows(_row(instruction_id, kwargs), response) == [expected]


@pytest.mark.parametrize(("instruction_id", "kwargs", "response"), LOOSE_ONLY)
def test_loose_only(instruction_id, kwargs, response):
    row = _row(instruction_id, kwargs)
    assert follows(row, response) == [False]
    assert follows(row, response, loose=True) == [True]


def test_loose_keeps_failing_what_no_variant_fixes():
    row = _row("punctuation:no_comma", {})
    assert follows(row, "Intro\nOne, two, three\nOutro", loose=True) == [False]


def test_an_empty_response_follows_nothing():
    # Even checks that an empty text trivially meets (no commas) fail on an empty response.
    for text in ("", "  \n "):
        assert follows(_row("punctuation:no_comma", {}), text) == [False]
        assert follows(_row("punctuation:no_comma", {}), text, loose=True) == [False]


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("", 0),
        ("Hello world", 1),
        ("Hello. World.", 2),
        ("line one\nline two", 1),  # a newline alone ends no sentence, as in punkt
        ("Mr. Smith went home. He slept.", 2),
        ("Pi is 3.14 today.", 1),
        ("1. Apples\n2. Pears", 3),  # punkt splits after a list number before a capital
        ("on page 5. then we left.", 1),
        ("Wait... what? No!", 2),
        ('He said "Stop." Then he left.', 2),
        ("I like tea, etc. The end.", 2),
        ("J. R. R. Tolkien wrote books.", 1),
    ],
)
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_words_and_word_tokens():
    assert count_words("don't stop-now, 3.5") == 6  # \w+ runs, as the official RegexpTokenizer
    tokens = word_tokens("DON'T STOP, the STATE-OF-THE-ART ARMY... I can't CANNOT")
    assert tokens == ["DO", "N'T", "STOP", "the", "STATE-OF-THE-ART", "ARMY", "I", "ca", "n't", "CAN", "NOT"]
