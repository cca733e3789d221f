"""Env rollouts: rows keep the sampled ids exactly (no re-tokenisation drift), environment tokens are
masked out, the sampler's log-probs line up with teacher forcing, episodes end, and generation compiles a
bounded number of times.

Most tests drive the rollout with a scripted sampler (chosen token ids, known log-probs), so the expected
row can be written down; the last two sample from a tiny random model whose end-of-turn token is likely
(so episodes have several turns)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from align_jax.data.bpe import train_tokenizer
from align_jax.data.formats import BadRowError, Origin
from align_jax.env_rollout import EnvSampling, env_rollout, max_compiles
from align_jax.envs import CalculatorEnv
from align_jax.envs.base import Environment, StepResult
from align_jax.envs.calculator import SYSTEM_PROMPT
from align_jax.generate import GenerateOutput, compile_count, generate
from align_jax.models.config import ModelConfig
from align_jax.models.transformer import forward, init_params

CORPUS = [SYSTEM_PROMPT, "What is 12 times 7?", "<calc>12*7</calc>", "12*7 = 84", "The answer is 84."] * 10
ROW = {"prompt": "What is 12 times 7?", "answer": "84"}
SETTINGS = EnvSampling(max_len=256, max_new_tokens=32, max_prompt_len=160)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request):
    return train_tokenizer(CORPUS, vocab_size=300, template=request.param)


def byte_ids(tok, text: str) -> list[int]:
    """`text` spelled one byte-level token per character (ASCII): a tokenisation BPE would never choose."""
    return tok.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text])


class Script:
    """A sampler with generate's signature that replies by a rule of the chat so far: `reply(prompt_text)
    -> token ids`. Token k of a call's row i gets log-prob -(call + 1) / 10 - k / 1000."""

    def __init__(self, tok, reply):
        self.tok, self.reply, self.widths, self.calls = tok, reply, [], 0

    def __call__(self, cfg, params, prompt_tokens, *, max_new_tokens, eos_id, **_):
        self.widths.append(len(prompt_tokens))
        rows = [self.reply(self.tok.decode(p))[:max_new_tokens] for p in prompt_tokens]
        tokens = np.zeros((len(rows), max_new_tokens), np.int32)
        logp = np.zeros((len(rows), max_new_tokens), np.float32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            logp[i, : len(r)] = -(self.calls + 1) / 10 - np.arange(len(r)) / 1000
        self.calls += 1
        lengths = np.asarray([len(r) for r in rows], np.int32)
        return GenerateOutput(tokens, logp, lengths, None, None)


def calculator_script(tok, call: list[int], answer: list[int]) -> Script:
    eot = [tok.eos_token_id]
    return Script(tok, lambda text: (answer if "= 84" in text else call) + eot)


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_row_is_prompt_sampled_env_sampled_with_env_tokens_masked(tok):
    call, answer = (
        tok.encode("<calc>12*7</calc>", add_special_tokens=False),
        tok.encode("The answer is 84.", add_special_tokens=False),
    )
    script = calculator_script(tok, call, answer)
    out = env_rollout(None, None, tok, [ROW, ROW], 2, SETTINGS, 0, env=CalculatorEnv, generate_fn=script)
    eot = [tok.eos_token_id]
    initial = CalculatorEnv().reset(ROW)
    prompt = tok(tok.apply_chat_template(initial, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    tool_turn = [
        *initial,
        {"role": "assistant", "content": "<calc>12*7</calc>"},
        {"role": "tool", "content": "12*7 = 84"},
    ]
    whole = tok.apply_chat_template(tool_turn, tokenize=False, add_generation_prompt=True)
    env_text = whole[len(tok.apply_chat_template(initial, tokenize=False, add_generation_prompt=True)) :]
    env_text = env_text[env_text.index("12*7</calc>") + len("12*7</calc>") + len(tok.eos_token) :]
    env = tok(env_text, add_special_tokens=False)["input_ids"]
    expected = prompt["input_ids"] + call + eot + env + answer + eot
    mask = [0] * len(prompt["input_ids"]) + [1] * (len(call) + 1) + [0] * len(env) + [1] * (len(answer) + 1)
    n = len(expected)
    for i in range(4):
        assert out.host["tokens"][i, :n].tolist() == expected and not out.host["tokens"][i, n:].any()
        assert out.host["loss_mask"][i].tolist() == mask + [0] * (SETTINGS.max_len - n)
        assert out.host["positions"][i, :n].tolist() == list(range(n)) and out.host["segment_ids"][i].sum() == n
    (a, b), (c, d) = spans(out.host["loss_mask"][0])
    np.testing.assert_allclose(out.logprobs[0, a:b], -0.1 - np.arange(b - a) / 1000, rtol=1e-6)
    np.testing.assert_allclose(out.logprobs[0, c:d], -0.2 - np.arange(d - c) / 1000, rtol=1e-6)
    assert out.logprobs[0][out.host["loss_mask"][0] == 0].tolist() == [0.0] * (SETTINGS.max_len - b + a - d + c)
    assert out.rewards.tolist() == [1.0] * 4 and out.turns.tolist() == [2] * 4 and not out.truncated.any()
    assert out.sampled.tolist() == [len(call) + len(answer) + 2] * 4
    assert out.messages[0][-1] == {"role": "assistant", "content": "The answer is 84."}
    assert "12*7 = 84" in out.texts[0] and out.texts[0].endswith("The answer is 84." + tok.eos_token)
    assert script.widths == [4, 4]  # every turn samples a full batch: one compiled shape


def test_no_retokenisation_drift(tok):
    """Replies the tokenizer would encode differently (byte by byte instead of BPE merges), and that the
    template rewrites (Llama 3 trims trailing spaces), stay in the row exactly as sampled."""
    call, answer = byte_ids(tok, "<calc>12*7</calc>  "), byte_ids(tok, "The answer is 84.  ")
    for ids in (call, answer):  # the precondition: a decode -> encode round trip changes these ids
        assert tok.encode(tok.decode(ids), add_special_tokens=False) != ids
    out = env_rollout(
        None, None, tok, [ROW], 1, SETTINGS, 0, env=CalculatorEnv, generate_fn=calculator_script(tok, call, answer)
    )
    eot = tok.eos_token_id
    (a, b), (c, d) = spans(out.host["loss_mask"][0])
    assert out.host["tokens"][0, a:b].tolist() == [*call, eot]
    assert out.host["tokens"][0, c:d].tolist() == [*answer, eot]
    assert out.rewards[0] == 1.0
    # Re-rendering the chat and encoding it again (what the row must NOT be) gives other ids.
    text = tok.apply_chat_template(out.messages[0], tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"] != out.host["tokens"][0, :d].tolist()


class Endless(Environment):
    """Always asks for more; only max_turns ends it."""

    max_turns = 2

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        return StepResult([{"role": "user", "content": "Go on."}], 0.25, False)


def test_episodes_end_at_max_turns_and_at_the_token_budget(tok):
    call = tok.encode("<calc>12*7</calc>", add_special_tokens=False)
    script = Script(tok, lambda _: [*call, tok.eos_token_id])  # never answers
    out = env_rollout(
        None, None, tok, [ROW], 2, SETTINGS, 0, env=lambda: CalculatorEnv(max_turns=3), generate_fn=script
    )
    assert out.turns.tolist() == [3, 3] and out.rewards.tolist() == [0.0, 0.0] and script.calls == 3
    out = env_rollout(
        None, None, tok, [ROW], 1, SETTINGS, 0, env=Endless, generate_fn=Script(tok, lambda _: [5, tok.eos_token_id])
    )
    assert out.turns.tolist() == [2] and out.rewards.tolist() == [0.5] and not out.truncated.any()
    # A reply cut at max_new_tokens (no end of turn) ends its episode.
    out = env_rollout(None, None, tok, [ROW], 1, SETTINGS, 0, env=Endless, generate_fn=Script(tok, lambda _: [5] * 40))
    assert out.turns.tolist() == [1] and out.truncated.tolist() == [True] and out.sampled.tolist() == [32]
    # The row is full: sampled tokens past max_len are cut.
    small = EnvSampling(max_len=40, max_new_tokens=32, max_prompt_len=16)
    out = env_rollout(None, None, tok, [ROW], 1, small, 0, env=Endless, generate_fn=Script(tok, lambda _: [5] * 30))
    assert out.truncated.tolist() == [True] and out.host["segment_ids"].sum() == 40
    assert out.prompt_lengths[0] == 16 and out.sampled[0] == 24  # the prompt was cut to max_prompt_len


def test_bad_rows_name_their_origin(tok):
    origin = Origin("problems.jsonl", 7, "line")
    with pytest.raises(BadRowError, match=r"problems\.jsonl.*answer"):
        env_rollout(None, None, tok, [({"prompt": "q"}, origin)], 1, SETTINGS, 0, env=CalculatorEnv, generate_fn=None)


def test_settings_from_a_grpo_config():
    g = ml_collections.ConfigDict(
        {"max_new_tokens": 16, "max_prompt_len": 32, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "env_max_len": 128}
    )
    s = EnvSampling.from_config(g)
    assert (s.max_len, s.max_new_tokens, s.max_prompt_len, s.temperature, s.top_k, s.bucket) == (
        128,
        16,
        32,
        0.7,
        5,
        32,
    )
    assert EnvSampling.from_config(g, greedy=True, max_len=64).temperature == 0.0
    g.env_max_len = 0
    with pytest.raises(ValueError, match="env_max_len"):
        EnvSampling.from_config(g)
    with pytest.raises(ValueError, match="max_prompt_len < max_len"):
        EnvSampling(max_len=32, max_new_tokens=8, max_prompt_len=32)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny model whose end-of-turn token has probability ~0.25 at every step: residual feature 0
    is a large constant, and only the end-of-turn logit reads it."""
    tok = train_tokenizer(CORPUS, vocab_size=300, template="chatml")
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, dtype="float32")  # fmt: skip
    params = init_params(cfg, jax.random.key(0))
    w = (params["lm_head"]["kernel"] * 10).at[0, :].set(0.0).at[0, tok.eos_token_id].set(0.8)
    params = {
        **params,
        "embed": {"embedding": params["embed"]["embedding"].at[:, 0].set(10.0)},
        "lm_head": {"kernel": w},
    }
    return cfg, params, tok


@pytest.fixture(scope="module")
def sampled(tiny):
    """Two rollouts (4 rows x 2 samples, up to 3 turns) and the generation compiles they cost."""
    cfg, params, tok = tiny

    class Echo(Endless):
        max_turns = 3

    settings = EnvSampling(max_len=64, max_new_tokens=8, max_prompt_len=32, temperature=1.0)
    rows = [{"prompt": f"What is {i} times 7?"} for i in range(4)]
    widths = []

    def recorded(**kw):
        widths.append((len(kw["prompt_tokens"]), max(len(p) for p in kw["prompt_tokens"])))
        return generate(**kw)

    before = compile_count()
    outs = [env_rollout(cfg, params, tok, rows, 2, settings, seed, env=Echo, generate_fn=recorded) for seed in (0, 1)]
    return outs, compile_count() - before, settings, widths


def test_generation_compiles_a_bounded_number_of_times(sampled):
    _, compiles, settings, widths = sampled
    assert {b for b, _ in widths} == {8}  # finished episodes leave padding, not a smaller batch
    assert len({-(-n // settings.bucket) for _, n in widths}) >= 2  # the prompts did grow across buckets
    assert 1 <= compiles <= max_compiles(settings) == 2


def test_sampler_logprobs_equal_teacher_forcing_on_the_row(tiny, sampled):
    cfg, params, _ = tiny
    for out in sampled[0]:
        assert (out.turns >= 2).sum() >= 4  # environment tokens sit between sampled turns
        h = out.host
        logits = forward(cfg, params, h["tokens"], h["positions"], h["segment_ids"])
        logp = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
        teacher = np.take_along_axis(logp, h["tokens"][:, 1:, None], axis=-1)[..., 0]
        target = h["loss_mask"][:, 1:] == 1
        assert h["loss_mask"][:, 0].sum() == 0 and target.sum() == out.sampled.sum()
        np.testing.assert_allclose(out.logprobs[:, 1:][target], teacher[target], atol=1e-4)
        assert not out.logprobs[h["loss_mask"] == 0].any()
        np.testing.assert_array_equal(out.sampler_logp[:, :-1], out.logprobs[:, 1:])  # old_logp's layout
