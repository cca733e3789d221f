"""Chat records -> (input_ids, loss_mask) under the tokenizer's own chat template.

Mask convention (the SFT loss relies on it): `loss_mask[t] == 1` means token t is a target, i.e. the
term -log p(tokens[t] | tokens[:t]) counts. So the mask is 1 on the assistant's content tokens and on
the end-of-turn token that closes them (the model must learn to stop), and 0 on the system and user
turns and on the assistant header `<|im_start|>assistant\\n` (the prompt writes that, not the model).

Real chat templates carry no `{% generation %}` markers, so assistant spans are found by rendering
growing prefixes of the conversation: the text of messages[:i] with the generation prompt ends where
assistant turn i's content starts, and the text of messages[:i+1] ends where that turn ends. Both
are checked to be prefixes of the whole rendering, as text and as tokens; a template or tokenizer
that breaks this (one that rewrites earlier turns depending on what follows, or merges tokens across
a turn boundary) gets a `TemplateError` instead of a silently wrong mask. Whatever the template puts
after the end-of-turn token (ChatML's trailing newline) is left out of the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LOSS_ON = ("assistant", "last_assistant", "all")
# Tokens that close a turn in common template families, besides the tokenizer's eos. Only those present
# in the vocabulary are used; see `end_of_turn_ids`.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class TemplateError(ValueError):
    """A chat template under which assistant spans cannot be located exactly."""


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """The eos id plus any known end-of-turn special token the tokenizer has (base Llama 3 tokenizers
    have eos=<|end_of_text|> but close turns with <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in KNOWN_END_OF_TURN if t in vocab)
    return frozenset(ids)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    loss_on: str = "assistant",
    eot_ids: frozenset[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenises a canonical chat with the tokenizer's chat template.

    Returns (input_ids int32 [L], loss_mask int32 [L]) where loss_mask is 1 on target tokens:
      assistant       every assistant turn's content + its end-of-turn token
      last_assistant  only the final assistant turn's
      all             every token (the packer still zeroes each sequence's first token: nothing predicts it)
    `eot_ids` overrides `end_of_turn_ids(tokenizer)` (pass it precomputed when tokenising many chats).
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template (a base model's?); set tokenizer.chat_template, e.g. to "
            "align_jax.data.bpe.CHATML_TEMPLATE with matching special tokens, or use the instruct model's tokenizer"
        )
    full_text = _render(tokenizer, messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    if loss_on == "all":
        turns = []

    # One batched tokenizer call for the whole chat and every boundary prefix.
    bounds = []
    for i in turns:
        start, end = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        if not (end.startswith(start) and full_text.startswith(end)):
            raise TemplateError(
                f"the chat template does not render assistant turn {i} as a prefix extension of the earlier turns "
                "(it rewrites earlier text depending on what follows), so its tokens cannot be located exactly"
            )
        bounds += [start, end]
    encoded = tokenizer([full_text, *bounds], add_special_tokens=False)["input_ids"]
    input_ids = np.asarray(encoded[0], np.int32)
    if loss_on == "all":
        return input_ids, np.ones_like(input_ids)

    eot_ids = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    loss_mask = np.zeros_like(input_ids)
    for turn, start_ids, end_ids in zip(turns, encoded[1::2], encoded[2::2], strict=True):
        for prefix in (start_ids, end_ids):
            if encoded[0][: len(prefix)] != prefix:
                raise TemplateError(
                    f"tokenising the chat up to assistant turn {turn} does not give a prefix of the whole chat's "
                    "tokens (the tokenizer merges across the turn boundary), so the loss mask would be wrong"
                )
        span = end_ids[len(start_ids) :]
        # Stop after the last end-of-turn token in the span: what a template writes after it (a newline
        # before the next turn) is formatting, not something the model should be trained to emit.
        stops = [k for k, t in enumerate(span) if t in eot_ids]
        length = stops[-1] + 1 if stops else len(span)
        loss_mask[len(start_ids) : len(start_ids) + length] = 1
    return input_ids, loss_mask
