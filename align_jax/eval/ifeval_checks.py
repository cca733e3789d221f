"""IFEval's 25 instruction checks, with the official semantics: `INSTRUCTIONS[id].fn(response, **kwargs)`.

Each check follows google-research's `instruction_following_eval` (instructions.py) as the IFEval paper
scores it: the same kwarg names (including the official spelling `section_spliter`), the same
relations ("less than": actual < n, "at least": actual >= n), case folding, and regular expressions.
The text units (sentences, words, capital words, language) are in ifeval_text.py, with where they
differ from nltk. Deliberate differences from the official code, none of which changes a score on
IFEval's own data:

  * keywords, forbidden words, section splitters and postscript markers are matched literally
    (re.escape); the official code pastes them into regular expressions unescaped, which fails or
    misreads on a kwarg with `+`, `(`, `?` ... IFEval's data has none.
  * a missing kwarg is an error when the prompt file is read (ifeval.py); the official code draws a
    random value for it, which makes the score depend on the run.

`Instruction.params` names each kwarg's kind, so ifeval.py can validate a row before anything runs:
"int" (an integer >= 0), "str" (non-empty), "str_list" (non-empty list of non-empty strings),
"relation" ("less than" | "at least"), "letter" (one ASCII letter).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable, Mapping

from align_jax.eval.ifeval_text import count_sentences, count_words, detect_language, word_tokens

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@dataclasses.dataclass(frozen=True)
class Instruction:
    id: str
    fn: Callable[..., bool]
    params: Mapping[str, str]  # kwarg -> kind (see the module doc)


INSTRUCTIONS: dict[str, Instruction] = {}


def instruction(instruction_id: str, **params: str) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    """Registers `fn(response, **kwargs) -> bool` under its official IFEval id."""

    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        INSTRUCTIONS[instruction_id] = Instruction(instruction_id, fn, params)
        return fn

    return register


def compare(actual: int, relation: str, n: int) -> bool:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return actual < n if relation == RELATIONS[0] else actual >= n


# keywords / language ----------------------------------------------------------------------------------


@instruction("keywords:existence", keywords="str_list")
def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    # Substrings, case-insensitive: "cat" is found in "category", as in the official check.
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@instruction("keywords:frequency", keyword="str", frequency="int", relation="relation")
def keywords_frequency(response: str, *, keyword: str, frequency: int, relation: str) -> bool:
    count = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return compare(count, relation, frequency)


@instruction("keywords:forbidden_words", forbidden_words="str_list")
def keywords_forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    # Whole words here (\b on both sides), unlike keywords:existence.
    return not any(re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words)


@instruction("keywords:letter_frequency", letter="letter", let_frequency="int", let_relation="relation")
def keywords_letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str) -> bool:
    return compare(collections.Counter(response.lower())[letter.strip().lower()], let_relation, let_frequency)


@instruction("language:response_language", language="str")
def response_language(response: str, *, language: str) -> bool:
    detected = detect_language(response)
    # Undetectable text (no letters) counts as followed, as in the official check.
    return detected is None or detected == language


# length_constraints -----------------------------------------------------------------------------------


@instruction("length_constraints:number_sentences", num_sentences="int", relation="relation")
def number_sentences(response: str, *, num_sentences: int, relation: str) -> bool:
    return compare(count_sentences(response), relation, num_sentences)


@instruction("length_constraints:number_paragraphs", num_paragraphs="int")
def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    # Paragraphs are separated by the markdown divider ***; an empty one is allowed only at either end.
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, part in enumerate(parts):
        if not part.strip():
            if 0 < i < len(parts) - 1:
                return False
            count -= 1
    return count == num_paragraphs


@instruction("length_constraints:number_words", num_words="int", relation="relation")
def number_words(response: str, *, num_words: int, relation: str) -> bool:
    return compare(count_words(response), relation, num_words)


@instruction("length_constraints:nth_paragraph_first_word", num_paragraphs="int", nth_paragraph="int", first_word="str")
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    # Paragraphs are separated by "\n\n"; empty ones do not count, but the nth is indexed among all of them.
    parts = response.split("\n\n")
    count = sum(1 for p in parts if p.strip())
    if not 1 <= nth_paragraph <= count:
        return False
    paragraph = parts[nth_paragraph - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:  # the word up to its first punctuation mark
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == num_paragraphs and first == first_word.lower()


# detectable_content / detectable_format ---------------------------------------------------------------


@instruction("detectable_content:number_placeholders", num_placeholders="int")
def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@instruction("detectable_content:postscript", postscript_marker="str")
def postscript(response: str, *, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    # The two official markers tolerate a space inside ("P. S."); "P.P.S" also matches without its final dot.
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


@instruction("detectable_format:number_bullet_lists", num_bullets="int")
def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    # Lines starting with "*" (not "**", bold) or "-"; the count must be exact.
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@instruction("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    text = response.strip()
    return any(option in text for option in CONSTRAINED_RESPONSES)


@instruction("detectable_format:number_highlighted_sections", num_highlights="int")
def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    # *x* and **x** on one line with some text inside. A **x** counts once: the *x* pattern sees only
    # its two empty "**" pairs.
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@instruction("detectable_format:multiple_sections", section_spliter="str", num_sections="int")
def multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    # Sections start with "<splitter> <number>" ("SECTION 1"); case-sensitive, as in the official check.
    splitter = r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?"
    return len(re.split(splitter, response)) - 1 >= num_sections


@instruction("detectable_format:json_format")
def json_format(response: str) -> bool:
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@instruction("detectable_format:title")
def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# combination / startend / change_case / punctuation ----------------------------------------------------


@instruction("combination:two_responses")
def two_responses(response: str) -> bool:
    # Exactly two non-empty, different answers separated by ******; empty parts only at either end.
    parts = response.split("******")
    answers = []
    for i, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(answers) == 2 and answers[0] != answers[1]


@instruction("combination:repeat_prompt", prompt_to_repeat="str")
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@instruction("startend:end_checker", end_phrase="str")
def end_checker(response: str, *, end_phrase: str) -> bool:
    # A closing quotation mark after the phrase is tolerated.
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@instruction("change_case:capital_word_frequency", capital_frequency="int", capital_relation="relation")
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str) -> bool:
    capitals = sum(1 for w in word_tokens(response) if w.isupper())
    return compare(capitals, capital_relation, capital_frequency)


@instruction("change_case:english_capital")
def english_capital(response: str) -> bool:
    # isupper() first, as the official check does: a lowercase response fails before detection runs.
    if not response.isupper():
        return False
    detected = detect_language(response)
    return detected is None or detected == "en"


@instruction("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    if not response.islower():
        return False
    detected = detect_language(response)
    return detected is None or detected == "en"


@instruction("punctuation:no_comma")
def no_comma(response: str) -> bool:
    # ASCII commas only: the official check ignores "，" and other scripts' commas.
    return "," not in response
