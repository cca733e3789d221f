"""Small byte-level BPE tokenizers with real chat templates, trained locally.

The demo and the tests cannot reach the Hugging Face hub, so they train their own tokenizer. It
behaves like a real one where the data pipeline cares: byte-level BPE (every string encodes, nothing
is unknown), special tokens that the pre-tokenizer never splits, a Jinja chat template in the style
of a real model family, and no `{% generation %}` markers (real templates have none, so the loss
mask must not depend on them). It saves and reloads with `save_pretrained` / `AutoTokenizer`.

Templates:
  chatml  (Qwen style)     <|im_start|>{role}\\n{content}<|im_end|>\\n ...; prompt: <|im_start|>assistant\\n
  llama3  (Llama 3 style)  <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Pre-tokenisation: a word with an optional leading space; single digits (so numbers are spelled
# digit by digit, which a tiny model learns arithmetic on far more easily); punctuation runs; runs of
# whitespace that end in newlines kept whole ("\n\n" is one piece whether or not text follows, which
# keeps the tokenisation of a chat prefix a prefix of the whole chat's); other whitespace.
SPLIT_PATTERN = r" ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s*[\r\n]+|\s+(?!\S)|\s+"

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# name -> (chat template, special tokens in id order, bos, eos (= end of turn), pad)
TEMPLATES: dict[str, tuple[str, tuple[str, ...], str | None, str, str]] = {
    "chatml": (CHATML_TEMPLATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (
        LLAMA3_TEMPLATE,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
}


def _with_role_names(texts: Iterable[str]) -> Iterator[str]:
    # The template writes role names into every turn header; make sure BPE sees them at least once.
    yield "system user assistant"
    yield from texts


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, template: str = "chatml"
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE of `vocab_size` (256 byte tokens + the template's special tokens +
    merges) on `texts`, with the named chat template. Deterministic for the same texts."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}; expected one of {sorted(TEMPLATES)}")
    chat_template, specials, bos, eos, pad = TEMPLATES[template]
    return train_bpe(_with_role_names(texts), vocab_size, chat_template, specials, bos=bos, eos=eos, pad=pad)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    chat_template: str,
    specials: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
) -> transformers.PreTrainedTokenizerFast:
    """`train_tokenizer` for any chat template and special tokens (the tests' real-template fixtures):
    `texts` as given, so a caller names the role words its template writes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below the {len(alphabet)} bytes + {len(specials)} special tokens")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        # Like Llama 3: plain `tokenizer(text)` prepends BOS. The chat template writes BOS itself, so
        # rendered chats must be tokenised with add_special_tokens=False (tokenize.py does).
        bos_id = tok.token_to_id(bos)
        post.append(
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
        )
    tok.post_processor = processors.Sequence(post)

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    hf.chat_template = chat_template
    return hf
