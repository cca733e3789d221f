"""Multi-turn and tool rollouts: episodes of the policy against an environment (align_jax/envs/), as
training rows whose loss counts only the tokens the policy sampled.

    out = env_rollout(model_cfg, params, tokenizer, rows, n, EnvSampling(max_len=256, max_new_tokens=48,
                      max_prompt_len=64, temperature=1.0), seed, sharder, env=env_factory("calculator"))
    out.host        tokens, positions, segment_ids, loss_mask [B, T] int32 (B = len(rows) * n, T = max_len)
    out.logprobs    [B, T] the sampler's log p of token t (0 where loss_mask is 0)
    out.rewards [B], out.turns [B], out.messages (each episode's chat), out.texts (decoded, for logs)

An episode. Turn 1 samples from the tokenized initial chat (`env.reset(row)` rendered with the generation
prompt, cut to its last max_prompt_len tokens as Rollouts cuts prompts). After every turn the environment
reads the reply (decoded text) and answers (`env.step`); unless the episode is over, its messages are
appended as TOKENS and the next turn samples from the whole sequence so far. The row is: prompt
(loss_mask 0), turn 1 exactly as sampled (1), environment tokens (0), turn 2 as sampled (1), ...
The sampled ids are never decoded and re-encoded: decoding is only for the environment and the logs, so
a non-canonical tokenisation the sampler produced, or text the template would rewrite (Llama 3 trims
replies), stays in the row exactly as the policy produced it, and its log-probs stay the sampler's.

Environment tokens come from the chat template, as the text the template adds when the environment's
messages and the next generation prompt follow the chat so far: `after` = render(chat + env messages,
generation prompt) must extend `closed` = render(chat) (else a TemplateError names the template), and the
env text is what the template writes after the reply's end-of-turn token in `closed` (ChatML's newline)
followed by after[len(closed):]. That text is tokenized on its own; the template's special tokens keep
it from merging with the sampled tokens before it.

An episode ends when the environment says so, after env.max_turns turns, when a reply stops without an
end-of-turn token (cut at max_new_tokens), or when the row is full (sampled tokens past max_len are cut;
environment tokens that leave no room to sample are not added); the last two set `truncated`.

Shapes. Every turn samples the still-active episodes as one batch padded to B (idle slots repeat an
active prompt; their samples are dropped), prompts padded to a multiple of `prompt_bucket`, with the same
max_new_tokens: generation compiles at most ceil(max_len / prompt_bucket) times per sampling kind.

Wiring into GRPO (align_jax/rollout.py, config option `env`, e.g. "calculator"). In Rollouts.sample:

    out = env_rollout(self.model_cfg, params, self.tokenizer, rows, n,
                      EnvSampling.from_config(g, greedy=greedy), seed, self.sharder, env=env_factory(g.env))
    host = {**out.host, "sampler_logp": out.sampler_logp}  # where the update reads the sampler's log-probs
    return out.prompts, [raw for raw, _ in rows for _ in range(n)], out.texts, host, out.sampled

and in Rollouts.rollout take the scores from `out.rewards` instead of `self.reward(...)`: the
environment is the reward (prompt augmentation does not apply: the environment writes the chat). The
metrics may add out.turns' mean, and `response_clipped` becomes out.truncated's mean (`sampled` sums
every turn). The rest is unchanged: score_samples, the KL, advantages and the update all read loss_mask,
which is 0 on prompt and environment tokens, so they count only the sampled tokens; the row is max_len
wide in every rollout, so the update compiles once. `out.logprobs` are the sampler's (float32, KV-cached)
log-probs, equal to the teacher-forced ones to float tolerance (tested), so the update may keep using
score_samples' old_logp.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jinja2
import numpy as np

from align_jax.data.formats import BadRowError
from align_jax.data.tokenize import TemplateError, end_of_turn_ids
from align_jax.envs.base import Environment, Message, as_rendered, check_step, tool_role
from align_jax.generate import GenerateOutput, generate
from align_jax.models.config import ModelConfig
from align_jax.sharding import Sharder


@dataclasses.dataclass(frozen=True)
class EnvSampling:
    """How an env rollout samples. max_len is T, the width of every training row (prompt + all turns +
    environment messages); max_new_tokens is per assistant turn."""

    max_len: int
    max_new_tokens: int
    max_prompt_len: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    prompt_bucket: int = 0  # generation prompt widths are multiples of this; 0: max_prompt_len

    def __post_init__(self) -> None:
        if not 1 <= self.max_prompt_len < self.max_len or self.max_new_tokens < 1 or self.prompt_bucket < 0:
            raise ValueError(
                f"EnvSampling: need 1 <= max_prompt_len < max_len, max_new_tokens >= 1, prompt_bucket >= 0; got "
                f"max_prompt_len={self.max_prompt_len}, max_len={self.max_len}, "
                f"max_new_tokens={self.max_new_tokens}, prompt_bucket={self.prompt_bucket}"
            )

    @property
    def bucket(self) -> int:
        return self.prompt_bucket or self.max_prompt_len

    @classmethod
    def from_config(cls, g: Any, *, greedy: bool = False, max_len: int | None = None) -> EnvSampling:
        """From a grpo config's sampling fields; max_len from the argument, else `g.env_max_len`."""
        max_len = max_len or int(g.get("env_max_len", 0) or 0)
        if not max_len:
            raise ValueError("env rollouts need a row width: set env_max_len (prompt + every turn + env messages)")
        return cls(
            max_len=max_len,
            max_new_tokens=int(g.max_new_tokens),
            max_prompt_len=int(g.max_prompt_len),
            temperature=0.0 if greedy else float(g.temperature),
            top_k=int(g.top_k),
            top_p=float(g.top_p),
        )


class EnvRollout(NamedTuple):
    """A batch of finished episodes. B = len(rows) * n (a row's n episodes are consecutive), T = max_len."""

    host: dict[str, np.ndarray]  # tokens, positions, segment_ids, loss_mask: [B, T] int32, as Rollouts builds
    logprobs: np.ndarray  # [B, T] float32: the sampler's log p(tokens[t] | tokens[:t]); 0 where loss_mask is 0
    # [B, T] the same numbers in old_logp's layout: column t holds token t + 1's (Rollouts' host["sampler_logp"])
    sampler_logp: np.ndarray
    rewards: np.ndarray  # [B] float32: the sum of the environment's step rewards
    turns: np.ndarray  # [B] int32: assistant turns sampled
    sampled: np.ndarray  # [B] int32: sampled tokens in the row (loss_mask's sum)
    truncated: np.ndarray  # [B] bool: ended by a token budget (see the module docstring)
    prompt_lengths: np.ndarray  # [B] int32: tokens of the initial chat
    prompts: list[list[Message]]  # each episode's initial chat (env.reset's)
    messages: list[list[Message]]  # each episode's chat: initial chat, replies (decoded), env messages
    texts: list[str]  # each row after the prompt, decoded with special tokens (for logs)


@dataclasses.dataclass
class _Episode:
    env: Environment
    messages: list[Message]
    tokens: list[int]
    mask: list[int]
    logp: list[float]
    prompt_len: int
    prompt: list[Message]
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer-side facts every step needs, worked out once per rollout."""

    tokenizer: Any
    eot_ids: frozenset[int]
    eot_strings: tuple[str, ...]
    role: str  # what tool messages render as

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTemplate:
        eot = end_of_turn_ids(tokenizer)
        strings = tuple(tokenizer.convert_ids_to_tokens(sorted(eot)))
        return cls(tokenizer, eot, strings, tool_role(tokenizer))

    def render(self, messages: Sequence[Message], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                as_rendered(messages, self.role), tokenize=False, add_generation_prompt=generation_prompt
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"env rollout: the chat template of {self.name} rejects the episode's chat: {e}") from e

    @property
    def name(self) -> str:
        return repr(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reply_text(self, ids: Sequence[int]) -> str:
        body = list(ids[:-1]) if ids and ids[-1] in self.eot_ids else list(ids)
        return self.tokenizer.decode(body, skip_special_tokens=True)


def env_token_ids(chat: ChatTemplate, messages: Sequence[Message], env_messages: Sequence[Message]) -> list[int]:
    """The tokens that follow the reply's end-of-turn token when `env_messages` and the next generation
    prompt follow the chat `messages` (which ends with that reply); see the module docstring."""
    closed = chat.render(messages, False)
    after = chat.render([*messages, *env_messages], True)
    if not after.startswith(closed):
        raise TemplateError(
            f"env rollout: the chat template of {chat.name} renders the chat differently once the environment's "
            "messages follow it (it rewrites earlier turns, or ends a chat's text with a token it drops later), so "
            "the environment's tokens cannot be appended to the sampled ones; multi-turn rollouts need a template "
            "whose rendering of a chat is a prefix of its rendering of any longer chat"
        )
    ends = [closed.rfind(s) + len(s) for s in chat.eot_strings if s in closed]
    if not ends:
        raise TemplateError(
            f"env rollout: the chat template of {chat.name} closes the assistant turn with none of the "
            f"end-of-turn tokens {list(chat.eot_strings)}, so the sampled reply's end cannot be located in it"
        )
    return chat.encode(closed[max(ends) :] + after[len(closed) :])


def _start(env: Environment, row: Mapping[str, Any], origin: Any, chat: ChatTemplate, s: EnvSampling) -> _Episode:
    try:
        messages = [dict(m) for m in env.reset(row)]
    except BadRowError as e:
        if e.origin is not None or origin is None:
            raise
        raise BadRowError(origin, e.field, e.problem) from e
    if not messages:
        raise ValueError(f"{type(env).__name__}.reset returned an empty chat")
    ids = chat.encode(chat.render(messages, True))[-s.max_prompt_len :]
    return _Episode(env, messages, ids, [0] * len(ids), [0.0] * len(ids), len(ids), list(messages))


def _turn_seed(seed: int, turn: int) -> int:
    return int(np.random.default_rng([seed, turn]).integers(2**31))


def _sample(active: list[_Episode], width: int, s: EnvSampling, seed: int, gen: Callable, **kw) -> list:
    """(sampled ids, their log-probs) for each active episode, from one batch of `width` prompts."""
    prompts = [e.tokens for e in active] + [active[0].tokens] * (width - len(active))
    out = gen(
        prompt_tokens=prompts,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        seed=seed,
        prompt_bucket=s.bucket,
        **kw,
    )
    tokens, logprobs, lengths = (np.asarray(jax.device_get(x)) for x in (out.tokens, out.logprobs, out.lengths))
    return [(tokens[i, : lengths[i]].tolist(), logprobs[i, : lengths[i]].tolist()) for i in range(len(active))]


def _advance(e: _Episode, ids: list[int], logp: list[float], chat: ChatTemplate, max_len: int) -> None:
    """Adds a sampled turn to the episode, lets the environment answer, and appends its tokens."""
    keep = ids[: max_len - len(e.tokens)]
    e.tokens += keep
    e.mask += [1] * len(keep)
    e.logp += logp[: len(keep)]
    ended = bool(keep) and len(keep) == len(ids) and keep[-1] in chat.eot_ids  # closed by the policy itself
    e.messages.append({"role": "assistant", "content": chat.reply_text(keep)})
    e.turns += 1
    result = check_step(e.env.step(e.messages), e.env)
    e.reward += float(result.reward)
    if result.done or not ended or e.turns >= e.env.max_turns:
        e.done, e.truncated = True, not ended
        return
    env_ids = env_token_ids(chat, e.messages, result.messages)
    if len(e.tokens) + len(env_ids) >= max_len:  # no room left to sample a reply
        e.done, e.truncated = True, True
        return
    e.messages += [dict(m) for m in result.messages]
    e.tokens += env_ids
    e.mask += [0] * len(env_ids)
    e.logp += [0.0] * len(env_ids)


def _host(episodes: Sequence[_Episode], max_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    b = len(episodes)
    tokens, mask, logp = np.zeros((b, max_len), np.int32), np.zeros((b, max_len), np.int32), np.zeros((b, max_len))
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        tokens[i, :n], mask[i, :n], logp[i, :n] = e.tokens, e.mask, e.logp
    cols = np.arange(max_len)[None, :]
    real = cols < np.asarray([len(e.tokens) for e in episodes])[:, None]
    host = {
        "tokens": tokens,
        "positions": np.where(real, cols, 0).astype(np.int32),
        "segment_ids": real.astype(np.int32),
        "loss_mask": mask,
    }
    return host, logp.astype(np.float32)


def env_rollout(
    model_cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    rows: Sequence[Any],
    n: int,
    settings: EnvSampling,
    seed: int,
    sharder: Sharder = Sharder(),
    *,
    env: Callable[[], Environment],
    generate_fn: Callable[..., GenerateOutput] = generate,
) -> EnvRollout:
    """n episodes per prompt row with the policy `params`; see the module docstring.

    rows: raw prompt rows, or (raw row, origin) pairs as PromptStream.take gives them (the origin names
        the file and line in the error for a bad row).
    env: makes a fresh environment per episode (`align_jax.envs.env_factory(name)`).
    generate_fn: the sampler, align_jax.generate.generate or anything with its signature and output.
    """
    if n < 1:
        raise ValueError(f"env_rollout: n must be >= 1, got {n}")
    chat = ChatTemplate.of(tokenizer)
    pairs = [r if isinstance(r, tuple) else (r, None) for r in rows]
    episodes = [_start(env(), raw, origin, chat, settings) for raw, origin in pairs for _ in range(n)]
    if not episodes:
        raise ValueError("env_rollout: no prompt rows")
    gen = {"cfg": model_cfg, "params": params, "eos_id": sorted(chat.eot_ids), "sharder": sharder}
    turn = 0
    while active := [e for e in episodes if not e.done]:
        sampled = _sample(active, len(episodes), settings, _turn_seed(seed, turn), generate_fn, **gen)
        for e, (ids, logp) in zip(active, sampled, strict=True):
            _advance(e, ids, logp, chat, settings.max_len)
        turn += 1
    host, logp = _host(episodes, settings.max_len)
    return EnvRollout(
        host=host,
        logprobs=logp,
        sampler_logp=np.pad(logp[:, 1:], ((0, 0), (0, 1))),
        rewards=np.asarray([e.reward for e in episodes], np.float32),
        turns=np.asarray([e.turns for e in episodes], np.int32),
        sampled=host["loss_mask"].sum(axis=1).astype(np.int32),
        truncated=np.asarray([e.truncated for e in episodes], bool),
        prompt_lengths=np.asarray([e.prompt_len for e in episodes], np.int32),
        prompts=[e.prompt for e in episodes],
        messages=[e.messages for e in episodes],
        texts=[tokenizer.decode(e.tokens[e.prompt_len :], skip_special_tokens=False) for e in episodes],
    )


def max_compiles(settings: EnvSampling) -> int:
    """The most generation programs one env rollout setting compiles (prompt widths x 1 sampling kind)."""
    return math.ceil(settings.max_len / settings.bucket)
