"""GRPO's and PPO's rollouts: prompts -> sampled responses -> rewards -> a scored batch for the update.

One rollout: `batch_size / group_size` prompts from the prompt stream (optionally augmented, the PAS
hook) -> `group_size` samples each from the current policy (align_jax/generate.py) -> rewards (rules
and/or a trained RM, align_jax/rewards.py; DAPO's overlong shaping) -> with dynamic sampling, more rounds
of prompts until the batch holds only groups whose rewards differ (or the rounds run out) -> one
teacher-forced pass of the policy and the frozen reference over the samples (the old log-probs and the
per-token KL) -> advantages (losses/advantages.py). The batch is reused for `updates_per_rollout`
optimizer steps. Field meanings: align_jax/batch.py (ROLLOUT_FIELDS).

Sampler and trainer share one model definition, so the sampler's log-probs of its tokens (sampler_logp)
and the trainer's teacher-forced ones (old_logp) agree up to float error when the params are the same;
`logp_mismatch/*` measures it every rollout. old_logp is always the trainer's under the params the
rollout is scored with; sampler_logp is under whatever params sampled (the same here; older ones for a
sampler that runs a step behind), and truncated importance sampling (tis_cap) corrects for the gap.

Several processes: each reads its slice of the rollout's prompts (whole groups), the sampler runs on the
global prompt array, and each process decodes and rewards only its own rows; scores and KL are gathered
where batch statistics need every row (advantages, metrics), so the batch equals a single process's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from align_jax.batch import TOKEN_FIELDS
from align_jax.data.multihost import all_rows, global_value, host_rows, local_rows
from align_jax.data.prompts import PromptStream, prompt_messages
from align_jax.data.tokenize import end_of_turn_ids
from align_jax.engine import generate_many
from align_jax.env_rollout import EnvSampling, env_rollout
from align_jax.generate import generate
from align_jax.lora import tree as lora_tree
from align_jax.losses import advantages as adv_lib
from align_jax.losses import rl
from align_jax.losses.grpo import reference_topk_of, score_samples
from align_jax.models.apply import ApplyFn, forward
from align_jax.models.config import ModelConfig
from align_jax.sample_ahead import SampleAhead
from align_jax.sharding import Sharder
from align_jax.train import loop


def pad_last(x_BT1: jax.Array) -> jax.Array:
    """[B, T-1] per-target values -> [B, T] (a zero last column), the shape every batch field has."""
    return jnp.pad(jnp.asarray(x_BT1, jnp.float32), ((0, 0), (0, 1)))


def place_sampler_logp(logprobs_BN: np.ndarray, prompt_len: np.ndarray, gen_len: np.ndarray, width: int) -> np.ndarray:
    """The sampler's log-probs [B, N] of its completion tokens -> [B, width] in old_logp's layout: completion token
    j sits at sequence position plen + j and is predicted at column plen + j - 1. 0 elsewhere."""
    cols = np.arange(width)[None, :]
    j = cols - prompt_len[:, None] + 1
    real = (j >= 0) & (j < gen_len[:, None])
    taken = np.take_along_axis(np.asarray(logprobs_BN, np.float32), np.clip(j, 0, logprobs_BN.shape[1] - 1), axis=1)
    return np.where(real, taken, 0.0).astype(np.float32)


def kl_to_come(adv: np.ndarray, kl_tok: np.ndarray, mask: np.ndarray, kl_coef: float) -> np.ndarray:
    """The report's KL in the token reward: token rewards -kl_coef * KL_t (+ the score at the end), so
    the KL part of a token's return is the KL still to come. It joins the group-normalised score
    unnormalised: normalising it with the scores would blow tiny KL differences between equally scored
    samples up to +-1, and the policy would learn to stop early (less KL to sum) instead of to answer well."""
    togo = np.flip(np.cumsum(np.flip(kl_tok, axis=1), axis=1), axis=1)
    return adv - kl_coef * togo * mask


class Rollouts:
    """Makes GRPO/PPO batches from the current state (TrainState: policy params, frozen reference)."""

    def __init__(
        self,
        g: ml_collections.ConfigDict,
        *,
        model_cfg: ModelConfig,
        sharder: Sharder,
        tokenizer: Any,
        policy_fn: ApplyFn,
        reward: Callable,
        augment: Callable,
        prompts: PromptStream,
        ptx: Any = None,
        value_fn: ApplyFn | None = None,
        env: Callable[[], Any] | None = None,
        batch_size: int,
        seed: int,
    ):
        self.g, self.model_cfg, self.sharder, self.tokenizer = g, model_cfg, sharder, tokenizer
        self.reward, self.augment, self.prompts, self.ptx = reward, augment, prompts, ptx
        self.batch_size, self.seed = batch_size, seed
        self.ppo = value_fn is not None
        self.eot_ids = sorted(end_of_turn_ids(tokenizer))
        k = min(int(g.kl_topk), model_cfg.vocab_size)
        chunk = int(g.train.loss_chunk)  # the LM head in chunks here too: no [B, T, V] logits in scoring
        self._score = jax.jit(
            functools.partial(score_samples, apply_fn=policy_fn, estimator=g.kl_estimator, topk=k, loss_chunk=chunk)
        )
        self._ptx_ref = jax.jit(functools.partial(reference_topk_of, apply_fn=policy_fn, topk=k, loss_chunk=chunk))
        self._values = jax.jit(functools.partial(forward, value_fn)) if value_fn is not None else None
        self._mismatch = jax.jit(rl.logp_mismatch)
        self.cached, self.left, self.count, self.metrics = None, 0, 0, {}
        self.env = env  # makes a fresh environment per episode (multi-turn rollouts), or None: single replies
        self.ahead = SampleAhead(self._sample_job, int(g.rollout_staleness))
        # Several processes: each samples, decodes and scores its own rows of the batch (its prompts' groups),
        # and sees every row's scores and KL only where batch statistics need them (advantages, metrics).
        self.hosts = jax.process_count() > 1
        self.part = (jax.process_index(), jax.process_count())
        self.rows = (0, batch_size)
        if self.hosts:  # (the settings that cannot run on several processes are refused by stages/grpo.py)
            self.rows = host_rows(self._prompt_sharding(batch_size), (batch_size, int(g.max_prompt_len)))

    def _mine(self, total: int) -> tuple[int, int]:
        """This process's rows [lo, hi) of a global batch of `total` rows (checked against the mesh: host_rows)."""
        p, count = self.part
        return p * total // count, (p + 1) * total // count

    def _prompt_sharding(self, rows: int) -> jax.sharding.Sharding:
        return self.sharder.sharding(("activation_batch", None), (rows, int(self.g.max_prompt_len)))

    def _global_prompts(self, tokens: list[list[int]]) -> tuple[jax.Array, np.ndarray]:
        """This process's prompts -> (the global [B, max_prompt_len] prompt array, every row's length)."""
        width = int(self.g.max_prompt_len)
        local = np.zeros((len(tokens), width), np.int32)
        for i, t in enumerate(tokens):
            local[i, : len(t)] = t
        lengths = all_rows(np.asarray([len(t) for t in tokens], np.int32))
        shape = (len(lengths), width)
        return jax.make_array_from_process_local_data(self._prompt_sharding(shape[0]), local, shape), lengths

    def policy(self, state: Any) -> Any:
        params = state.params["policy"] if self.ppo else state.params
        if self.model_cfg.lora_rank:  # the adapters; their frozen base rides in state.frozen (lora/plan.py)
            params = lora_tree.merge(params, state.frozen)
        return params

    # -- sampling ------------------------------------------------------------------------------------

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-int(self.g.max_prompt_len) :]

    def augmented(self, rows: list[tuple[Any, Any]]) -> tuple[list[list[dict]], list[Any]]:
        messages = [prompt_messages(raw, origin) for raw, origin in rows]
        kept = [raw for raw, _ in rows]
        # An augmenter with a `batch` method (the PAS model's) augments the whole rollout in one call.
        batch_fn = getattr(self.augment, "batch", None)
        if batch_fn is not None:
            return batch_fn(messages, kept), kept
        return [self.augment(m, raw) for m, raw in zip(messages, kept, strict=True)], kept

    def sample(self, params, rows: list[tuple[Any, Any]], n: int, greedy: bool, seed: int):
        """(prompts, rows, responses, host batch, response lengths) for n samples of each row's prompt."""
        g = self.g
        prompts, kept = self.augmented(rows)
        prompts = [p for p in prompts for _ in range(n)]
        kept = [r for r in kept for _ in range(n)]
        common = dict(
            max_new_tokens=int(g.max_new_tokens),
            temperature=0.0 if greedy else float(g.temperature),
            top_k=int(g.top_k),
            top_p=float(g.top_p),
            eos_id=self.eot_ids,
            seed=seed,
            sharder=self.sharder,
        )
        tokens = [self.prompt_tokens(p) for p in prompts]
        if self.hosts:  # the sampler takes the global prompt array, each process's rows on its own devices
            tokens, common["prompt_lengths"] = self._global_prompts(tokens)
        if int(g.rollout_slots):
            # The refill engine: rows that end free their slot for the next prompt, so a long answer does
            # not hold a whole batch (align_jax/engine.py); prompts prefill at their own width.
            out = generate_many(
                self.model_cfg, params, tokens, prompt_width=int(g.max_prompt_len), slots=int(g.rollout_slots), **common
            )
        else:
            out = generate(self.model_cfg, params, tokens, prompt_bucket=int(g.max_prompt_len), **common)
        # This process's rows (all of them on one process): it decodes and rewards only those.
        seqs, plen, glen, logprobs, sampled = (
            local_rows(x, self._mine(x.shape[0]))
            for x in (out.sequences, out.prompt_lengths, out.lengths, out.logprobs, out.tokens)
        )
        texts = self.decode(sampled, glen)
        cols = np.arange(seqs.shape[1])[None, :]
        end = (plen + glen)[:, None]
        host = {
            "tokens": np.where(cols < end, seqs, 0).astype(np.int32),
            "positions": np.where(cols < end, cols, 0).astype(np.int32),
            "segment_ids": (cols < end).astype(np.int32),
            "loss_mask": ((cols >= plen[:, None]) & (cols < end)).astype(np.int32),
            "sampler_logp": place_sampler_logp(logprobs, plen, glen, seqs.shape[1]),
        }
        return prompts, kept, texts, host, glen

    def decode(self, tokens: np.ndarray, glen: np.ndarray) -> list[str]:
        texts = []
        for i in range(tokens.shape[0]):
            body = tokens[i, : glen[i]]
            if glen[i] and body[-1] in self.eot_ids:
                body = body[:-1]
            texts.append(self.tokenizer.decode(body.tolist(), skip_special_tokens=True))
        return texts

    # -- the batch -----------------------------------------------------------------------------------

    def next_batch(self, run: Any, state: Any) -> tuple[dict[str, jax.Array], dict]:
        """The current rollout's batch, made anew every `updates_per_rollout` steps."""
        if self.left == 0:
            self.cached = self.rollout(run, state)
            self.left = int(self.g.updates_per_rollout)
        self.left -= 1
        return self.cached

    def rollout(self, run: Any, state: Any) -> tuple[dict[str, jax.Array], dict]:
        t0 = time.perf_counter()
        policy = self.policy(state)
        ((host, glen, scores, sampling), prompts_after), age = self.ahead.get(policy, self.count)
        if self.ahead.staleness:
            # A checkpoint now must resume after this rollout's prompts, not after those of the rollouts
            # already being sampled ahead (their samples die with the process).
            self.prompts.held = prompts_after
        t1 = time.perf_counter()
        batch = run.global_batch(host)
        old_logp, ref_logp, kl = self._score(policy, state.frozen, batch)
        mask = np.asarray(host["loss_mask"][:, 1:], np.float32)
        kl_tok = local_rows(kl, self.rows) * mask
        # Group and batch statistics (advantages, metrics) over every process's rows; each keeps its own.
        scores, kl_tok, mask, glen = (all_rows(x) for x in (scores, kl_tok, mask, glen))
        adv = self.advantages(state, batch, scores, kl_tok, mask)
        adv = np.concatenate([adv, np.zeros((adv.shape[0], 1), np.float32)], axis=1)  # [B, T], like the tokens
        lo, hi = self.rows
        batch.update(
            old_logp=pad_last(old_logp),
            ref_logp=pad_last(ref_logp),
            advantages=run.global_batch({"a": adv[lo:hi].astype(np.float32)})["a"],
        )
        if self.hosts and self.ppo:  # computed for every row on every process: each hands over its own
            batch.update({k: run.global_batch({k: np.asarray(batch[k])[lo:hi]})[k] for k in ("returns", "old_values")})
        mismatch = self._mismatch(batch["sampler_logp"][:, :-1], old_logp, batch["loss_mask"][:, 1:])
        if self.ptx is not None:
            batch.update(self.ptx_batch(run, state))
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        self.count += 1
        self.metrics = self.rollout_metrics(kl_tok, mask, glen, t1 - t0, t2 - t1)
        self.metrics.update(sampling, rollout_age=float(age))
        self.metrics.update({f"logp_mismatch/{k}": float(v) for k, v in mismatch.items()})
        return batch, loop.batch_stats(host)

    def _sample_job(self, params: Any, count: int) -> tuple[tuple, dict]:
        """Rollout `count`'s samples and the prompt stream's position after them (SampleAhead's job)."""
        return self.sample_groups(params, count), self.prompts.state(live=True)

    def draw(self, params, rows: list[tuple[Any, Any]], n: int, greedy: bool, seed: int):
        """(host batch, response lengths, scores, reward parts) of n samples (or episodes) per prompt row."""
        if self.env is None:
            prompts, kept, texts, host, glen = self.sample(params, rows, n, greedy, seed)
            return (host, glen, *self.reward(prompts, texts, kept))
        g = self.g
        settings = EnvSampling.from_config(g, greedy=greedy, max_len=int(g.data.seq_len))
        out = env_rollout(self.model_cfg, params, self.tokenizer, rows, n, settings, seed, self.sharder, env=self.env)
        # The environment is the reward; sampled counts every turn's tokens.
        host = {**out.host, "sampler_logp": out.sampler_logp}
        return host, out.sampled, out.rewards, {"env": out.rewards, "turns": out.turns.astype(np.float32)}

    def sample_round(self, params: Any, index: int, count: int) -> tuple[dict, np.ndarray, np.ndarray, dict]:
        """(host batch, lengths, shaped scores, reward parts) of batch_size / group_size fresh prompts."""
        g, n = self.g, int(self.g.group_size)
        rows = self.prompts.take(self.batch_size // n, part=self.part)
        key = [self.seed, count] + ([index] if index else [])  # round 0 keeps the seed it always had
        seed = int(np.random.default_rng(key).integers(2**31))
        host, glen, scores, parts = self.draw(params, rows, n, greedy=False, seed=seed)
        if int(g.overlong_buffer):
            pen = np.asarray(
                adv_lib.overlong_penalty(glen, max_len=int(g.max_new_tokens), buffer=int(g.overlong_buffer))
            )
            parts = {**parts, "overlong": pen}
            scores = (scores + float(g.overlong_penalty_factor) * pen).astype(np.float32)
        return host, glen, scores, parts

    def sample_groups(self, params: Any, count: int) -> tuple[dict, np.ndarray, np.ndarray, dict]:
        """(host batch, lengths, scores, metrics) of batch_size responses in groups of group_size.

        Dynamic sampling (DAPO; dynamic_sampling_max_rounds > 0): groups whose rewards are all equal are dropped and
        another round of prompts is sampled, same shapes, until the batch is full of informative groups or the extra
        rounds run out; then dropped groups fill what is left (their GRPO/RLOO advantage is 0). reward/* metrics
        cover every sampled response (the policy's reward), not only the kept ones."""
        n, n_groups = int(self.g.group_size), self.batch_size // int(self.g.group_size)
        extra = int(self.g.dynamic_sampling_max_rounds)
        rounds, informative, found = [], [], 0
        while True:
            rounds.append(self.sample_round(params, len(rounds), count))
            informative.append(np.asarray(adv_lib.informative_groups(all_rows(rounds[-1][2]), n)))
            found += int(informative[-1].sum())
            if not extra or found >= n_groups or len(rounds) > extra:
                break
        scores = np.concatenate([r[2] for r in rounds])
        every = all_rows(scores)  # the policy's reward: over every process's rows
        metrics = {"reward/mean": float(every.mean()), "reward/std": float(every.std())}
        metrics.update({f"reward/{k}": float(np.mean([all_rows(r[3][k]) for r in rounds])) for k in rounds[0][3]})
        if not extra:
            host, glen, scores, _ = rounds[0]
            return host, glen, scores, {**metrics, "groups_constant": float(1.0 - informative[0].mean())}
        keep, n_filler = adv_lib.fill_groups(np.concatenate(informative), n_groups)
        rows = (keep[:, None] * n + np.arange(n)[None, :]).reshape(-1)
        host = {k: np.concatenate([r[0][k] for r in rounds])[rows] for k in rounds[0][0]}
        glen = np.concatenate([r[1] for r in rounds])[rows]
        sampled = len(rounds) * n_groups
        metrics.update(
            groups_constant=n_filler / n_groups,
            groups_dropped=float(sampled - found) / sampled,
            sampling_rounds=float(len(rounds)),
        )
        return host, glen, scores[rows], metrics

    def advantages(self, state, batch, scores, kl_tok, mask) -> np.ndarray:
        """[B, T-1] per-token advantages (config `advantage`): GRPO's group-normalised or RLOO's leave-one-out
        scores (KL to come inside, kl_mode = reward), REINFORCE++'s batch-whitened returns, or PPO's whitened
        GAE advantages."""
        g = self.g
        if self.ppo:
            return self.ppo_targets(state, batch, scores, kl_tok, mask)
        n, kl_coef = int(g.group_size), float(g.kl_coef) if g.kl_mode == "reward" else 0.0
        if g.advantage.startswith("reinforce_pp"):
            group = n if g.advantage == "reinforce_pp_baseline" else None
            return np.asarray(
                adv_lib.reinforce_pp_advantages(scores, kl_tok, mask, kl_coef=kl_coef, group_size=group), np.float32
            )
        if g.advantage == "rloo":
            adv = np.asarray(adv_lib.rloo_advantages(jnp.asarray(scores), n))
        else:
            adv = np.asarray(adv_lib.group_advantages(jnp.asarray(scores), n, scale=g.advantage_scale))
        adv = np.broadcast_to(adv[:, None], mask.shape) * mask
        return kl_to_come(adv, kl_tok, mask, kl_coef) if kl_coef else adv

    def ppo_targets(self, state, batch, scores, kl_tok, mask) -> np.ndarray:
        """PPO: token rewards (KL inside, score at the end), values of the old value model, GAE; stores the
        returns and old values in the batch and returns the whitened advantages [B, T-1]."""
        g = self.g
        kl_coef = float(g.kl_coef) if g.kl_mode == "reward" else 0.0
        m = jnp.asarray(mask)
        rewards = rl.kl_in_reward(jnp.asarray(scores), jnp.asarray(kl_tok), m, kl_coef=kl_coef)
        values = self._values(state.params["value"], batch)[:, :-1]  # state at t, before token t+1
        if self.hosts:  # beside the host-side rewards, which hold every process's rows
            values = jnp.asarray(global_value(values))
        adv, returns = rl.gae(rewards, values, m, gamma=float(g.gamma), lam=float(g.lam))
        adv = rl.whiten(adv, m)
        batch.update(returns=pad_last(returns), old_values=pad_last(values))
        return np.asarray(adv)

    def ptx_batch(self, run: Any, state: Any) -> dict[str, jax.Array]:
        batch = run.global_batch(next(self.ptx))
        out = {f"ptx_{k}": batch[k] for k in TOKEN_FIELDS}
        if self.g.ptx_kind == "kl":
            out["ptx_ref_values"], out["ptx_ref_indices"] = self._ptx_ref(state.frozen, batch)
        return out

    def rollout_metrics(self, kl_tok, mask, glen, sample_s: float, score_s: float) -> dict:
        kl_seq = kl_tok.sum(axis=1)
        return {
            "kl": float(kl_seq.sum() / max(mask.sum(), 1.0)),
            "kl/sequence": float(kl_seq.mean()),
            "response_length": float(glen.mean()),
            "response_clipped": float((glen == int(self.g.max_new_tokens)).mean()),
            "time/rollout_s": sample_s,
            "time/logprobs_s": score_s,
        }

    # -- eval ----------------------------------------------------------------------------------------

    def evaluate(self, rows: list[tuple[Any, Any]], state: Any) -> dict[str, float]:
        """Greedy responses to the eval prompts: mean reward (and each part) and response length."""
        bs = self.batch_size
        totals, parts_sum, lengths, count = 0.0, {}, 0.0, 0
        for lo in range(0, len(rows), bs):
            chunk = rows[lo : lo + bs]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (bs - real)  # a full batch: one compiled shape
            a, b = self._mine(bs)  # each process answers its rows; the sums are over all of them
            _, glen, scores, parts = self.draw(self.policy(state), chunk[a:b], 1, greedy=True, seed=0)
            glen, scores, parts = all_rows(glen), all_rows(scores), {k: all_rows(v) for k, v in parts.items()}
            scores, parts = scores[:real], {k: v[:real] for k, v in parts.items()}
            totals += float(scores.sum())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.sum())
            lengths += float(glen[:real].sum())
            count += real
        out = {"eval_reward": totals / max(count, 1), "eval_response_length": lengths / max(count, 1)}
        out.update({f"eval_reward/{k}": v / max(count, 1) for k, v in parts_sum.items()})
        return out
