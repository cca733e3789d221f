"""The text units IFEval's checks count: sentences, words, word tokens, and the response's language.

The official IFEval code (google-research `instruction_following_eval`, vendored by lm-eval as its
`ifeval` task) counts these with nltk and langdetect:

  sentences        nltk's punkt English model (`nltk.data.load("tokenizers/punkt/english.pickle")`)
  words            `nltk.tokenize.RegexpTokenizer(r"\\w+")`: runs of word characters
  capital words    `nltk.word_tokenize` (punkt, then the Treebank word tokenizer), tokens with `isupper()`
  language         `langdetect.detect`

Why not depend on lm-eval or nltk: nltk fetches punkt's model with `nltk.download`, from GitHub, at run
time; this project's machines and CI reach PyPI only, and the PyPI packages that bundle nltk data are
one-person repackagings we would rather not trust. lm-eval also pulls torch, datasets, evaluate and
more for a scorer of ~700 lines. So the checks are written here (ifeval_checks.py) with the official
semantics, and only langdetect is a dependency: it is pure Python with its language profiles inside
the wheel, so it works offline. It is seeded (`DetectorFactory.seed = 0`) since its sampling is
otherwise random and short texts can change language between runs; the official scorer does not seed.

Where this differs from the official counts (nltk-free approximations, documented so a reader can tell
a real disagreement from a known one):

  count_sentences  follows punkt's decision rules without its learned statistics. A candidate break is
                   `.`, `?` or `!` (a run of them, then optional closing quotes or brackets) followed by
                   whitespace and a token; newlines alone never end a sentence, as in punkt. `?` and `!`
                   always break. After `.`: a word in ABBREVIATIONS or a single letter (an initial)
                   breaks only when the next word is a common sentence starter ("Mr. Smith" is one
                   sentence, "etc. The" two); a number ("1.", "2023.") breaks unless the next word is
                   lowercase, so "1. Apples\\n2. Pears" is three sentences as in punkt; an ellipsis breaks
                   before a capitalised word; any other word breaks. Punkt learned its abbreviation list
                   and each word's capitalisation statistics from a corpus, so rare abbreviations and
                   names after initials can still differ.
  word_tokens      splits off the punctuation and the clitics the Treebank tokenizer splits (`n't`,
                   `'s`, `'re`, `'ve`, `'ll`, `'d`, `'m`, "cannot"), keeping hyphenated words and
                   inner periods whole; `isupper()` of the pieces is what the official check counts, so
                   "DON'T" is two capital words, "STATE-OF-THE-ART" one, as there.
"""

from __future__ import annotations

import re

from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

# Deterministic detection: langdetect samples n-grams at random unless seeded.
DetectorFactory.seed = 0

# A period after one of these is no sentence break unless a common sentence starter follows.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr mt ft vs etc e.g i.e a.m p.m u.s u.k inc ltd co corp no vol fig approx dept "  # noqa: SIM905
    "est jan feb aug sept oct nov dec gen col lt sgt capt gov sen rep rev".split()
)
# Words that begin sentences often enough that punkt breaks after an abbreviation or initial before them.
SENTENCE_STARTERS = frozenset(
    "the a an this that these those it its he she we they i you there in on at but and so if when then "  # noqa: SIM905
    "however as for my our his her their what how why who yes".split()
)

# A run of terminal punctuation, optional closing quotes/brackets, then whitespace and the next token.
_CANDIDATE = re.compile(r"""([.?!]+)["'”’)\]}*]*(?=\s+(\S+))""")
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.\-]*$")
_LEADING_PUNCT = "\"'“‘([{*"
_WORD_RUN = re.compile(r"\w+")
_TREEBANK_SPLIT = re.compile(r"""[,;:!?()\[\]{}<>"“”‘`]|--|\.{2,}|(?<=\w)\.(?=\s|$)""")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
_CANNOT = re.compile(r"^(can)(not)$", re.IGNORECASE)


def _next_word_starts_sentence(word: str) -> bool:
    return word[:1].isupper() and word.strip("\"'“‘([{*").rstrip(".,;:!?").lower() in SENTENCE_STARTERS


def _breaks(before: str, terminator: str, next_token: str) -> bool:
    """Whether punkt would end a sentence at `terminator` (the text `before` it, the token after it)."""
    if "?" in terminator or "!" in terminator:
        return True
    if len(terminator) > 1:  # an ellipsis: a break only before what looks like a new sentence
        return next_token[:1].isupper()
    chunks = before.rsplit(None, 1)
    word = chunks[-1].lstrip(_LEADING_PUNCT).lower() if chunks else ""
    if _NUMBER.match(word):
        # Punkt's ordinal rule: a lowercase word after "5." continues the sentence.
        return not next_token[:1].islower() and next_token[:1] not in ";:,.!?"
    is_initial = len(word) == 1 and word.isalpha()
    if is_initial or word in ABBREVIATIONS or word.rsplit("-", 1)[-1] in ABBREVIATIONS:
        return _next_word_starts_sentence(next_token)
    return True


def count_sentences(text: str) -> int:
    """Sentences as punkt's English model would split them, approximately (see the module doc)."""
    text = text.strip()
    if not text:
        return 0
    return 1 + sum(_breaks(text[: m.start()], m.group(1), m.group(2)) for m in _CANDIDATE.finditer(text))


def count_words(text: str) -> int:
    """Runs of word characters, as the official RegexpTokenizer(r"\\w+") counts them."""
    return len(_WORD_RUN.findall(text))


def word_tokens(text: str) -> list[str]:
    """Treebank-like word tokens (see the module doc); punctuation tokens are dropped, since no
    punctuation-only token is `isupper()`."""
    out: list[str] = []
    for chunk in _TREEBANK_SPLIT.sub(" ", text).split():
        chunk = chunk.strip("'’")
        if not chunk:
            continue
        m = _CLITIC.match(chunk) or _CANNOT.match(chunk)
        out.extend([m.group(1), m.group(2)] if m else [chunk])
    return out


def detect_language(text: str) -> str | None:
    """langdetect's language code for `text` ("en", "fr", "zh-cn", ...), or None where it finds no
    features to judge by (no letters); the official checks count that case as followed."""
    try:
        return detect(text)
    except LangDetectException:
        return None
