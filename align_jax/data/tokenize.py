"""Chat records -> (input_ids, loss_mask) samples under the tokenizer's own chat template.

Mask convention (the SFT loss relies on it): `loss_mask[t] == 1` means token t is a target, i.e. the
term -log p(tokens[t] | tokens[:t]) counts. So the mask is 1 on the assistant's reply tokens and on
the end-of-turn token that closes them (the model must learn to stop), and 0 on the system and user
turns, on the assistant header `<|im_start|>assistant\\n` (the prompt writes that, not the model) and on
whatever the template writes after the end-of-turn token (ChatML's newline, Phi-3's `<|endoftext|>`
after the final turn): formatting the model never generates, since decoding stops at end of turn.

Real chat templates carry no `{% generation %}` markers, so assistant spans are found by rendering:
the text of messages[:i] with the generation prompt (what the model sees at inference before writing
turn i) ends where turn i's reply starts, and the text of messages[:i+1] ends after it. Each text is
checked to extend the one before it, as text and as tokens, so a template or tokenizer that breaks
this gets a `TemplateError` (naming the `loss_on` that works) instead of a silently wrong mask.

`loss_on` (data.loss_on) picks the samples a chat becomes:
  auto            `assistant` where the template renders the chat as growing prefixes, else `per_turn`
  assistant       one sample, the whole chat; every assistant turn is a target. Needs a template that
                  renders each turn the same whatever follows it (not Qwen3, which drops reasoning from
                  earlier turns; not Phi-3, which ends the text with eos; not Mistral v0.3 with a system
                  message, which it writes only into a final user turn)
  per_turn        one sample per assistant turn, rendered as the model sees it at inference: the prompt
                  messages[:i] with the generation prompt, then the reply; only the reply is a target
  last_assistant  the per_turn sample of the final assistant turn only (messages after it are dropped)
  all             one sample, the whole chat, every token a target (the packer still zeroes each
                  sequence's first token: nothing predicts it)
Under `auto` or `per_turn` every reply token is a target exactly once, in the context the template
gives it at inference; per_turn repeats each earlier turn's tokens as context, which costs compute.

A template's own refusal of a chat (a Jinja `raise_exception`, e.g. Gemma 2's "System role not
supported") is a `TemplateRejected`: the loaders treat it as a bad row of the data, not of the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np

LOSS_ON = ("auto", "assistant", "per_turn", "last_assistant", "all")
# Tokens that close a turn in common template families, besides the tokenizer's eos. Only those present
# in the vocabulary are used; see `end_of_turn_ids`.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
Example = tuple[np.ndarray, np.ndarray]  # (input_ids int32 [L], loss_mask int32 [L])
PER_TURN_HINT = (
    "set data.loss_on='per_turn' (or 'auto', the default) to train each assistant turn as its own sample, "
    "rendered as the model sees it at inference"
)


class TemplateError(ValueError):
    """A chat template under which assistant spans cannot be located exactly."""


class TemplateRejected(TemplateError):
    """The chat template itself refused this chat (its Jinja raised): a problem of the row."""


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """The eos id plus any known end-of-turn special token the tokenizer has (base Llama 3 tokenizers
    have eos=<|end_of_text|> but close turns with <|eot_id|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in KNOWN_END_OF_TURN if t in vocab)
    return frozenset(ids)


def _rejection(messages: Sequence[dict[str, str]], error: Exception) -> str:
    problem = f"the chat template rejects this chat: {error}"
    if messages and messages[0]["role"] == "system" and "system" in str(error).lower():
        # Gemma 2's template has no place for a system message (Gemma 3's folds it into the first user turn).
        problem += "; this template takes no system message: fold the system text into the first user turn or drop it"
    return problem + " (data.on_bad_row='skip' skips the rows a template rejects)"


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid Jinja: {e}") from e
    except jinja2.TemplateError as e:
        raise TemplateRejected(_rejection(messages, e)) from e
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def _check_args(tokenizer: Any, loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; expected one of {LOSS_ON}")
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "the tokenizer has no chat template (a base model's?); set tokenizer.chat_template, e.g. to "
            "align_jax.data.bpe.CHATML_TEMPLATE with matching special tokens, or use the instruct model's tokenizer"
        )


def _prefix_problem(full: str, bounds: Sequence[tuple[str, str]], turns: Sequence[int]) -> str | None:
    """Why the chat does not render as growing prefixes (None when it does). `bounds[k]` is turn
    turns[k]'s (prompt, end): messages[:i] with the generation prompt, and messages[:i+1]."""
    for i, (prompt, end) in zip(turns, bounds, strict=True):
        if not end.startswith(prompt):
            return f"the chat template renders the prompt before assistant turn {i} differently once the reply follows"
        if not full.startswith(end):
            return (
                f"the chat template renders assistant turn {i} differently once later turns follow (it rewrites "
                "earlier text depending on what follows)"
            )
    return None


def _turn_text(tokenizer: Any, messages: Sequence[dict[str, str]], i: int, prompt: str, end: str) -> str:
    """Assistant turn i's sample as the model sees it at inference: `prompt` (messages[:i] with the
    generation prompt), then the reply as the template writes it (`end` is messages[:i+1])."""
    if end.startswith(prompt):
        return end
    # Mistral v0.3 writes the system message only into a final user turn, so a chat that ends in a reply
    # renders without it. The reply is then taken as the template writes it in the chat without the
    # system message, and put after the inference prompt (which has it).
    if i > 1 and messages[0]["role"] == "system":
        rest = messages[1:]
        bare_prompt, bare_end = _render(tokenizer, rest[: i - 1], True), _render(tokenizer, rest[:i], False)
        reply = bare_end[len(bare_prompt) :]
        if reply and bare_end.startswith(bare_prompt) and end.endswith(reply):
            return prompt + reply
    raise TemplateError(
        f"the chat template's text for the chat up to assistant turn {i} does not start with the prompt it "
        "renders before that turn, so the reply cannot be located in it; use data.loss_on='all' (no mask) or "
        "a template whose prompt and reply render consistently"
    )


def _reply_length(tokenizer: Any, span: Sequence[int], eot_ids: frozenset[int]) -> int:
    """How many tokens of `span` (what follows a turn's prompt) the model writes: through the end-of-turn
    token that closes the reply. That is the first end-of-turn token of the span's tail of end-of-turn and
    whitespace tokens, not the last: Phi-3 writes `<|end|>\\n<|endoftext|>` after the final reply, and
    generation stops at `<|end|>`. Looking only at the tail keeps a reply that quotes such a token whole."""
    stop, k = None, len(span)
    while k > 0 and (span[k - 1] in eot_ids or not tokenizer.decode([span[k - 1]]).strip()):
        k -= 1
        if span[k] in eot_ids:
            stop = k
    return len(span) if stop is None else stop + 1


def _prefix_ids(whole: list[int], prefix: list[int], turn: int) -> int:
    if whole[: len(prefix)] != prefix:
        raise TemplateError(
            f"tokenising the chat up to assistant turn {turn} does not give a prefix of the whole chat's tokens "
            "(the tokenizer merges across the turn boundary), so the loss mask would be wrong; "
            "data.loss_on='all' needs no boundary"
        )
    return len(prefix)


def _whole_chat(
    tokenizer: Any, full: str, bounds: list[tuple[str, str]], turns: list[int], eot: frozenset[int]
) -> Example:
    """The `assistant` sample: the whole chat, with every turn's reply a target."""
    encoded = tokenizer([full, *(t for b in bounds for t in b)], add_special_tokens=False)["input_ids"]
    input_ids = np.asarray(encoded[0], np.int32)
    loss_mask = np.zeros_like(input_ids)
    for turn, start_ids, end_ids in zip(turns, encoded[1::2], encoded[2::2], strict=True):
        lo, hi = _prefix_ids(end_ids, start_ids, turn), _prefix_ids(encoded[0], end_ids, turn)
        loss_mask[lo : lo + _reply_length(tokenizer, encoded[0][lo:hi], eot)] = 1
    return input_ids, loss_mask


def _per_turn(tokenizer: Any, texts: list[tuple[str, str]], turns: list[int], eot: frozenset[int]) -> list[Example]:
    """One sample per (prompt, text) pair, the reply after the prompt its only target."""
    encoded = tokenizer([t for pair in texts for t in pair], add_special_tokens=False)["input_ids"]
    out = []
    for turn, prompt_ids, ids in zip(turns, encoded[::2], encoded[1::2], strict=True):
        lo = _prefix_ids(ids, prompt_ids, turn)
        input_ids = np.asarray(ids, np.int32)
        loss_mask = np.zeros_like(input_ids)
        loss_mask[lo : lo + _reply_length(tokenizer, ids[lo:], eot)] = 1
        out.append((input_ids, loss_mask))
    return out


def chat_examples(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    loss_on: str = "auto",
    eot_ids: frozenset[int] | None = None,
) -> tuple[list[Example], str | None]:
    """Tokenises a canonical chat with the tokenizer's chat template into the samples `loss_on` asks for
    (see the module docstring): a list of (input_ids int32 [L], loss_mask int32 [L]), and, when `auto`
    fell back to `per_turn` for this chat, why (else None). `eot_ids` overrides
    `end_of_turn_ids(tokenizer)` (pass it precomputed when tokenising many chats)."""
    _check_args(tokenizer, loss_on)
    if loss_on == "all":
        ids = tokenizer(_render(tokenizer, messages, False), add_special_tokens=False)["input_ids"]
        input_ids = np.asarray(ids, np.int32)
        return [(input_ids, np.ones_like(input_ids))], None
    eot_ids = end_of_turn_ids(tokenizer) if eot_ids is None else eot_ids
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_assistant":
        if not turns:
            raise ValueError("loss_on='last_assistant': the chat has no assistant turn")
        turns = turns[-1:]
    bounds = [(_render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)) for i in turns]
    fallback = None
    if loss_on in ("assistant", "auto"):
        full = _render(tokenizer, messages, False)
        fallback = _prefix_problem(full, bounds, turns)
        if fallback is None:
            return [_whole_chat(tokenizer, full, bounds, turns, eot_ids)], None
        if loss_on == "assistant":
            raise TemplateError(f"{fallback}, so its tokens cannot be located in the whole chat; {PER_TURN_HINT}")
    texts = [
        (prompt, _turn_text(tokenizer, messages, i, prompt, end))
        for i, (prompt, end) in zip(turns, bounds, strict=True)
    ]
    return _per_turn(tokenizer, texts, turns, eot_ids), fallback


def tokenize_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    loss_on: str = "assistant",
    eot_ids: frozenset[int] | None = None,
) -> Example:
    """The single sample of a chat under `loss_on` "assistant", "last_assistant" or "all" (see the module
    docstring): (input_ids int32 [L], loss_mask int32 [L]). "auto" and "per_turn" may give several
    samples per chat: use `chat_examples`."""
    if loss_on in ("auto", "per_turn"):
        raise ValueError(f"loss_on={loss_on!r} may give several samples per chat; use chat_examples")
    (example,), _ = chat_examples(tokenizer, messages, loss_on, eot_ids)
    return example
