"""GRPO: online RL with group-normalised advantages (DeepSeekMath; the Baichuan report's final stage).

Each rollout: `batch_size / group_size` prompts from the prompt rows (optionally augmented, the PAS
hook) -> `group_size` samples each from the current policy (align_jax/generate.py) -> rewards (rules
and/or a trained RM, align_jax/rewards.py) -> one teacher-forced pass of the policy and the frozen
reference over the samples (the old log-probs and the per-token KL) -> advantages -> one or more
clipped policy-gradient updates on that batch.

KL to the reference (`grpo.kl_mode`):
  reward  the report's choice: token rewards r_t = -kl_coef * KL_t, plus the score at the last token.
          A token's advantage is the group-normalised score minus kl_coef x the KL still to come in its
          sample (its return's KL part, not normalised with the scores). KL_t is k1, k3, or the exact KL
          over the reference's top-k logits (`kl_estimator = topk`, k = kl_topk, the report's top-500).
  loss    DeepSeekMath: kl_coef * mean k3 (or k1) added to the loss.
  none    no KL term.

PTX (`grpo.ptx_coef` > 0): each step also takes a packed batch of SFT chats (`grpo.ptx_data`) and adds
ptx_coef x the per-token mean of either the report's KL(policy || original model), exact over the
reference's top-k logits, or plain NLL, on their assistant tokens.

Prompt rows: {"prompt": str | [messages], ...any other fields the rules read, e.g. "answer"}.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from align_jax import rewards
from align_jax.config import resolve_data_path, validate
from align_jax.data.formats import BadRowError
from align_jax.data.sources import open_source
from align_jax.data.tokenize import end_of_turn_ids
from align_jax.generate import generate
from align_jax.losses import rl
from align_jax.losses.sft import token_nll
from align_jax.metrics import flops_per_token
from align_jax.models.heads import ScalarModel
from align_jax.models.hf import abstract_params
from align_jax.models.transformer import Decoder, boxed_init
from align_jax.sharding import batch_sharding
from align_jax.stages import build, runner
from align_jax.stages.rm import boxed_reward_init
from align_jax.train import loop
from align_jax.train.step import make_train_step

log = logging.getLogger(__name__)

STEP_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask", "old_logp", "ref_logp")
PTX_FIELDS = ("tokens", "positions", "segment_ids", "loss_mask")
# Prompt augmentation before sampling: name -> fn(prompt messages, row) -> prompt messages, optionally with a
# `batch(list of messages, rows) -> list of messages` attribute for one call per rollout. The PAS stage
# registers its model here; "none" leaves prompts as they are.
AUGMENTERS: dict[str, Callable[[list[dict], Mapping[str, Any]], list[dict]]] = {"none": lambda prompt, row: prompt}


def prompt_messages(row: Any, origin: Any) -> list[dict]:
    if not isinstance(row, Mapping) or "prompt" not in row:
        raise BadRowError(origin, "prompt", "a prompt row needs a 'prompt' (a string or a list of messages)")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise BadRowError(origin, "prompt", "expected a string or a non-empty list of {role, content} messages")


class PromptStream:
    """Endless, shuffled (one permutation per epoch), resumable prompt rows; every host reads the same
    rows (a rollout batch is small, and every host needs the whole batch to assemble it)."""

    def __init__(self, spec: str, seed: int):
        self.source = open_source(spec, split="train")
        self.seed, self.epoch, self.pos = seed, 0, 0
        self.rows = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        # One permutation per epoch, drawn once: a rollout should not reshuffle the whole prompt set.
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source)))
        return self._cached[1]

    def take(self, n: int) -> list[tuple[Any, Any]]:
        out = []
        while len(out) < n:
            order = self._order()
            k = min(n - len(out), len(order) - self.pos)
            out += self.source.read(order[self.pos : self.pos + k].tolist())
            self.pos += k
            if self.pos == len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        self.rows += n
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "rows": self.rows, "num_rows": len(self.source)}

    def restore(self, state: Mapping[str, Any]) -> None:
        if int(state["num_rows"]) != len(self.source):
            raise ValueError(f"prompt data changed: {state['num_rows']} rows when saved, {len(self.source)} now")
        self.epoch, self.pos, self.rows = int(state["epoch"]), int(state["pos"]), int(state["rows"])

    def stats(self) -> dict:
        return {"prompt_rows": self.rows, "epoch": self.epoch}


class Streams:
    """The prompt stream and, with PTX, the SFT batches, as one resumable data iterator."""

    def __init__(self, prompts: PromptStream, ptx: Any = None):
        self.prompts, self.ptx = prompts, ptx

    def state(self) -> dict:
        return {"prompts": self.prompts.state(), "ptx": self.ptx.state() if self.ptx is not None else None}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.prompts.restore(state["prompts"])
        if self.ptx is not None and state.get("ptx"):
            self.ptx.restore(state["ptx"])

    def stats(self) -> dict:
        out = self.prompts.stats()
        if self.ptx is not None:
            out["ptx_packing_efficiency"] = self.ptx.stats().get("packing_efficiency", 0.0)
        return out


class _Feed:
    """No prefetching: a rollout needs the params of the step before it."""

    def __init__(self, streams: Streams):
        self.streams = streams

    def state(self) -> dict:
        return self.streams.state()

    def close(self) -> None:
        pass


def token_logps(model, params, batch) -> tuple[jax.Array, jax.Array]:
    """(log-prob of each next token [B, T-1], logits [B, T-1, V]) under `params`."""
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])[:, :-1]
    nll, _ = token_nll(logits, batch["tokens"][:, 1:])
    return -nll, logits


class GRPORun(runner.StageRun):
    weight_name = "tokens"

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate(config)
        self.config, self.workdir = config, workdir
        g = config.grpo
        os.makedirs(workdir, exist_ok=True)
        self.tokenizer = build.load_tokenizer(config, workdir)
        self.sharder = build.make_sharder(config)
        self.model_cfg = build.model_config(config, self.tokenizer)
        self.model = Decoder(self.model_cfg, self.sharder)
        self.ppo = g.algorithm == "ppo"
        if self.ppo:
            self.value_model = ScalarModel(self.model_cfg, self.sharder)
            boxed_value = jax.eval_shape(functools.partial(boxed_reward_init, self.value_model), jax.random.key(0))
            boxed = {"policy": abstract_params(self.model_cfg, self.sharder), "value": boxed_value}
            self.setup = build.setup_state(self.model_cfg, self.sharder, config, boxed_abstract=boxed)
        else:
            self.value_model = None
            self.setup = build.setup_state(self.model_cfg, self.sharder, config)
        self.reward = rewards.build_reward(g.rules, json.loads(g.rule_kwargs), g.rm_workdir, float(g.rm_weight))
        if g.augment.startswith("pas:") and g.augment not in AUGMENTERS:
            # "pas:WORKDIR": a trained pas stage's model appends its complement to every prompt.
            from align_jax.pas.augment import register_grpo_augmenter

            register_grpo_augmenter(g.augment, g.augment[len("pas:") :])
        if g.augment not in AUGMENTERS:
            raise ValueError(f"config.grpo.augment={g.augment!r}; registered augmenters: {sorted(AUGMENTERS)}")
        self.augment = AUGMENTERS[g.augment]
        self.prompts = PromptStream(resolve_data_path(config.data.train), int(config.data.shuffle_seed))
        self.ptx = self._ptx_iterator() if g.ptx_coef else None
        self.train_iter = Streams(self.prompts, self.ptx)
        self.eval_rows = self._eval_rows() if config.data.eval else None
        self.eval_batches = self.eval_rows  # the driver evaluates when this is not None
        self.eot_ids = sorted(end_of_turn_ids(self.tokenizer))
        self.batch_shardings = {k: batch_sharding(self.sharder) for k in STEP_FIELDS}
        self.batch_shardings["advantages"] = batch_sharding(self.sharder)  # [B, T]: per token (KL to come)
        if self.ptx is not None:
            self.batch_shardings.update({f"ptx_{k}": batch_sharding(self.sharder) for k in PTX_FIELDS})
            if g.ptx_kind == "kl":
                self.batch_shardings.update(ptx_ref_values=batch_sharding(self.sharder, 3))
                self.batch_shardings.update(ptx_ref_indices=batch_sharding(self.sharder, 3))
        if self.ppo:
            self.batch_shardings.update(returns=batch_sharding(self.sharder), old_values=batch_sharding(self.sharder))
            loss = functools.partial(ppo_loss, model=self.model, value_model=self.value_model, config=g)
        else:
            loss = functools.partial(grpo_loss, model=self.model, config=g)
        self.train_step = make_train_step(
            loss,
            self.setup.optimizer,
            microbatches=int(config.train.microbatches),
            state_shardings=self.setup.state_shardings,
            batch_shardings=self.batch_shardings,
        )
        k = min(int(g.kl_topk), self.model_cfg.vocab_size)
        self._score = jax.jit(functools.partial(score_samples, model=self.model, estimator=g.kl_estimator, topk=k))
        self._ptx_ref = jax.jit(functools.partial(reference_topk_of, model=self.model, topk=k))
        if self.ppo:
            self._values = jax.jit(
                lambda p, b: self.value_model.apply({"params": p}, b["tokens"], b["positions"], b["segment_ids"])
            )
        self.state, self.ref_params, self.cached, self.left = None, None, None, 0
        self.rollouts, self.rollout_metrics = 0, {}

    def _ptx_iterator(self):
        from align_jax.data.pipeline import make_sft_iterator

        c = self.config
        cfg = {
            "train": resolve_data_path(c.grpo.ptx_data),
            "seq_len": int(c.data.seq_len),
            "batch_size": int(c.grpo.ptx_batch_size),
            "shuffle_seed": int(c.data.shuffle_seed),
        }
        return make_sft_iterator(cfg, self.tokenizer, split="train")

    def ptx_batch(self) -> dict[str, jax.Array]:
        host = next(self.ptx)
        batch = self.global_batch(host)
        out = {f"ptx_{k}": batch[k] for k in PTX_FIELDS}
        if self.config.grpo.ptx_kind == "kl":
            out["ptx_ref_values"], out["ptx_ref_indices"] = self._ptx_ref(self.ref_params, batch)
        return out

    def _eval_rows(self) -> list[tuple[Any, Any]]:
        source = open_source(resolve_data_path(self.config.data.eval), split=None)
        n = min(len(source), int(self.config.grpo.eval_prompts))
        return source.read(list(range(n)))

    # -- state and driver hooks ---------------------------------------------------------------------

    def initial_state(self, checkpointer) -> tuple[Any, dict, str]:
        if not self.ppo:
            state, data_state, how = build.initial_state(self.setup, self.config, checkpointer, self.workdir)
            self.ref_params = build.init_from_params(self.setup, self.config)
        else:
            state, data_state, how = self._ppo_initial_state(checkpointer)
            s = self.setup
            self.ref_params = build.init_from_params(
                s, self.config, s.abstract_params["policy"], s.param_shardings["policy"]
            )
        self.state = state
        return state, data_state, how

    def _ppo_initial_state(self, checkpointer):
        """Policy = init_from; value model = init_from's decoder + a fresh scalar head."""
        s, seed = self.setup, int(self.config.seed)
        head = jax.jit(
            lambda rng: nn.meta.unbox(boxed_reward_init(self.value_model, rng))["head"],
            out_shardings=s.param_shardings["value"]["head"],
        )

        def fresh(rng):
            policy = nn.meta.unbox(boxed_init(self.model_cfg, rng, sharder=self.sharder))
            return {"policy": policy, "value": nn.meta.unbox(boxed_reward_init(self.value_model, rng))}

        def from_init(params):
            # A copy for the value model: the two must not share buffers (the step donates the state).
            decoder = {k: v.copy() for k, v in params.items() if k != "lm_head"}
            return {"policy": params, "value": {"decoder": decoder, "head": head(jax.random.key(seed))}}

        return build.initial_state(
            s,
            self.config,
            checkpointer,
            self.workdir,
            fresh_params=fresh,
            init_abstract_params=s.abstract_params["policy"],
            params_from_init=from_init,
        )

    def policy_params(self, state) -> Any:
        return state.params["policy"] if self.ppo else state.params

    def step_fn(self, state, batch):
        self.state, metrics = self.train_step(state, batch)
        return self.state, metrics

    def start_feed(self) -> None:
        self.feed = _Feed(self.train_iter)

    def extra_metrics(self) -> dict[str, float]:
        return {**self.rollout_metrics, **{f"data/{k}": v for k, v in self.train_iter.stats().items()}}

    def flops_per_token(self, avg_context: float) -> float:
        return flops_per_token(self.model_cfg, avg_context)  # the update; rollout time is reported apart

    # -- rollout ------------------------------------------------------------------------------------

    def prompt_tokens(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-int(self.config.grpo.max_prompt_len) :]

    def sample(self, params, rows: list[tuple[Any, Any]], n: int, greedy: bool, seed: int):
        """(prompts, rows, responses, host batch) for n samples of each row's prompt."""
        g = self.config.grpo
        messages = [prompt_messages(raw, origin) for raw, origin in rows]
        kept = [raw for raw, _ in rows]
        # An augmenter with a `batch` method (the PAS model's) augments the whole rollout in one call.
        batch_fn = getattr(self.augment, "batch", None)
        if batch_fn is not None:
            prompts = batch_fn(messages, kept)
        else:
            prompts = [self.augment(m, raw) for m, raw in zip(messages, kept, strict=True)]
        prompts = [p for p in prompts for _ in range(n)]
        kept = [r for r in kept for _ in range(n)]
        out = generate(
            self.model_cfg,
            params,
            [self.prompt_tokens(p) for p in prompts],
            max_new_tokens=int(g.max_new_tokens),
            temperature=0.0 if greedy else float(g.temperature),
            top_k=int(g.top_k),
            top_p=float(g.top_p),
            eos_id=self.eot_ids,
            seed=seed,
            prompt_bucket=int(g.max_prompt_len),
            sharder=self.sharder,
        )
        seqs, plen, glen = (np.asarray(jax.device_get(x)) for x in (out.sequences, out.prompt_lengths, out.lengths))
        tokens = np.asarray(jax.device_get(out.tokens))
        texts = []
        for i in range(len(prompts)):
            body = tokens[i, : glen[i]]
            if glen[i] and body[-1] in self.eot_ids:
                body = body[:-1]
            texts.append(self.tokenizer.decode(body.tolist(), skip_special_tokens=True))
        cols = np.arange(seqs.shape[1])[None, :]
        end = (plen + glen)[:, None]
        host = {
            "tokens": np.where(cols < end, seqs, 0).astype(np.int32),
            "positions": np.where(cols < end, cols, 0).astype(np.int32),
            "segment_ids": (cols < end).astype(np.int32),
            "loss_mask": ((cols >= plen[:, None]) & (cols < end)).astype(np.int32),
        }
        return prompts, kept, texts, host, glen

    def next_batch(self) -> tuple[dict[str, jax.Array], dict]:
        if self.left == 0:
            self.cached = self.rollout()
            self.left = int(self.config.grpo.updates_per_rollout)
        self.left -= 1
        return self.cached

    def rollout(self) -> tuple[dict[str, jax.Array], dict]:
        g, c = self.config.grpo, self.config
        n = int(g.group_size)
        t0 = time.perf_counter()
        rows = self.prompts.take(int(c.data.batch_size) // n)
        seed = int(np.random.default_rng([int(c.seed), self.rollouts]).integers(2**31))
        policy = self.policy_params(self.state)
        prompts, kept, texts, host, glen = self.sample(policy, rows, n, greedy=False, seed=seed)
        t1 = time.perf_counter()
        scores, parts = self.reward(prompts, texts, kept)
        batch = self.global_batch(host)
        old_logp, ref_logp, kl = self._score(policy, self.ref_params, batch)
        mask = np.asarray(host["loss_mask"][:, 1:], np.float32)
        kl_tok = np.asarray(jax.device_get(kl)) * mask
        kl_seq = kl_tok.sum(axis=1)
        if self.ppo:
            adv = self.ppo_targets(batch, scores, kl_tok, mask)
        else:
            adv = np.asarray(rl.group_advantages(jnp.asarray(scores), n, scale=g.advantage_scale))
            adv = np.broadcast_to(adv[:, None], mask.shape) * mask
        if g.kl_mode == "reward" and not self.ppo:
            # Token rewards -kl_coef * KL_t (+ the score at the end): the KL part of a token's return is
            # the KL still to come. It joins the group-normalised score unnormalised: normalising it with
            # the scores would blow tiny KL differences between equally scored samples up to +-1, and
            # the policy would learn to stop early (less KL to sum) instead of to answer well.
            togo = np.flip(np.cumsum(np.flip(kl_tok, axis=1), axis=1), axis=1)
            adv = adv - float(g.kl_coef) * togo * mask
        adv = np.concatenate([adv, np.zeros((adv.shape[0], 1), np.float32)], axis=1)  # [B, T], like the tokens
        batch.update(
            old_logp=pad_last(old_logp),
            ref_logp=pad_last(ref_logp),
            advantages=self.global_batch({"a": adv.astype(np.float32)})["a"],
        )
        if self.ptx is not None:
            batch.update(self.ptx_batch())
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        self.rollouts += 1
        tokens_out = mask.sum()
        self.rollout_metrics = {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()),
            **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
            "kl": float(kl_seq.sum() / max(tokens_out, 1.0)),
            "kl/sequence": float(kl_seq.mean()),
            "response_length": float(glen.mean()),
            "response_clipped": float((glen == int(g.max_new_tokens)).mean()),
            "time/rollout_s": t1 - t0,
            "time/logprobs_s": t2 - t1,
        }
        return batch, loop.batch_stats(host)

    def ppo_targets(self, batch, scores, kl_tok, mask) -> np.ndarray:
        """PPO: token rewards (KL inside, score at the end), values of the old value model, GAE; stores the
        returns and old values in the batch and returns the whitened advantages [B, T-1]."""
        g = self.config.grpo
        kl_coef = float(g.kl_coef) if g.kl_mode == "reward" else 0.0
        m = jnp.asarray(mask)
        rewards = rl.kl_in_reward(jnp.asarray(scores), jnp.asarray(kl_tok), m, kl_coef=kl_coef)
        values = self._values(self.state.params["value"], batch)[:, :-1]  # state at t, before token t+1
        adv, returns = rl.gae(rewards, values, m, gamma=float(g.gamma), lam=float(g.lam))
        adv = rl.whiten(adv, m)
        batch.update(returns=pad_last(returns), old_values=pad_last(values))
        return np.asarray(adv)

    def evaluate(self, state) -> dict[str, float]:
        """Greedy responses to the first `grpo.eval_prompts` eval prompts: mean reward (and each part)."""
        bs = int(self.config.data.batch_size)
        totals, parts_sum, lengths, count = 0.0, {}, 0.0, 0
        for lo in range(0, len(self.eval_rows), bs):
            chunk = self.eval_rows[lo : lo + bs]
            real = len(chunk)
            chunk = chunk + [chunk[-1]] * (bs - real)  # a full batch: one compiled shape
            prompts, kept, texts, _, glen = self.sample(self.policy_params(state), chunk, 1, greedy=True, seed=0)
            scores, parts = self.reward(prompts[:real], texts[:real], kept[:real])
            totals += float(scores.sum())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.sum())
            lengths += float(glen[:real].sum())
            count += real
        out = {"eval_reward": totals / max(count, 1), "eval_response_length": lengths / max(count, 1)}
        out.update({f"eval_reward/{k}": v / max(count, 1) for k, v in parts_sum.items()})
        return out


def pad_last(x_BT1: jax.Array) -> jax.Array:
    """[B, T-1] per-target values -> [B, T] (a zero last column), the shape every batch field has."""
    return jnp.pad(jnp.asarray(x_BT1, jnp.float32), ((0, 0), (0, 1)))


def score_samples(params, ref_params, batch, *, model, estimator: str, topk: int):
    """Teacher-forced (old log-probs, reference log-probs, per-token KL), each [B, T-1], no gradient."""
    logp, logits = token_logps(model, params, batch)
    ref_logp, ref_logits = token_logps(model, ref_params, batch)
    if estimator == "topk":
        values, indices = rl.reference_topk(ref_logits, topk)
        kl = rl.topk_exact_kl(logits, values, indices)
    else:
        kl = rl.kl_estimate(logp, ref_logp, estimator)
    return jax.lax.stop_gradient((logp, ref_logp, kl))


def reference_topk_of(ref_params, batch, *, model, topk: int) -> tuple[jax.Array, jax.Array]:
    """The reference's top-k (logits, ids) at every position of an SFT batch, [B, T-1, k] each."""
    _, logits = token_logps(model, ref_params, batch)
    return rl.reference_topk(logits, topk)


def ptx_term(params, batch, *, model, kind: str) -> tuple[jax.Array, jax.Array]:
    """(sum, count) over the SFT batch's target tokens of KL(policy || reference) (top-k exact) or NLL."""
    from align_jax.losses.sft import target_mask

    sft = {k: batch[f"ptx_{k}"] for k in PTX_FIELDS}
    logp, logits = token_logps(model, params, sft)
    mask = target_mask(sft).astype(jnp.float32)
    if kind == "kl":
        return rl.ptx_kl_term(logits, batch["ptx_ref_values"], batch["ptx_ref_indices"], mask)
    return (-logp * mask).sum(), mask.sum()


def grpo_loss(params, batch, rng, *, model, config) -> tuple[jax.Array, jax.Array, dict]:
    """Clipped policy gradient on the rollout batch (+ kl_coef x KL when kl_mode = "loss")."""
    del rng
    logp, logits = token_logps(model, params, batch)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    loss_sum, denom, metrics = rl.policy_gradient_loss(
        logp,
        batch["old_logp"][:, :-1],
        batch["advantages"][:, :-1],
        mask,
        clip_eps=float(config.clip_eps),
        clip_eps_high=float(config.clip_eps_high) or None,
        normalise=config.normalise,
    )
    if config.kl_mode == "loss":
        kind = "k1" if config.kl_estimator == "k1" else "k3"
        kl_sum, kl_n = rl.kl_loss_term(logp, batch["ref_logp"][:, :-1], mask, kind=kind)
        scale = denom / jnp.maximum(kl_n, 1.0)  # per-token mean, in the objective's own normalisation
        loss_sum = loss_sum + float(config.kl_coef) * kl_sum * scale
        metrics["kl_loss"] = (kl_sum, kl_n)
    if config.ptx_coef:
        ptx_sum, ptx_n = ptx_term(params, batch, model=model, kind=config.ptx_kind)
        # ptx_coef x its per-token mean, in the objective's normalisation (the step divides by denom).
        loss_sum = loss_sum + float(config.ptx_coef) * ptx_sum * denom / jnp.maximum(ptx_n, 1.0)
        metrics[f"ptx_{config.ptx_kind}"] = (ptx_sum, ptx_n)
    metrics["entropy"] = rl.entropy_from_logits(jax.lax.stop_gradient(logits), mask)
    return loss_sum, denom, metrics


def ppo_loss(params, batch, rng, *, model, value_model, config) -> tuple[jax.Array, jax.Array, dict]:
    """PPO: the clipped policy gradient with per-token (GAE) advantages, plus vf_coef x the clipped value
    loss, both per token in the objective's normalisation; PTX as in GRPO."""
    loss_sum, denom, metrics = grpo_loss(params["policy"], batch, rng, model=model, config=config)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    values = value_model.apply({"params": params["value"]}, batch["tokens"], batch["positions"], batch["segment_ids"])
    v_sum, v_n = rl.value_loss(
        values[:, :-1],
        batch["old_values"][:, :-1],
        batch["returns"][:, :-1],
        mask,
        clip_eps=float(config.value_clip_eps),
    )
    loss_sum = loss_sum + float(config.vf_coef) * v_sum * denom / jnp.maximum(v_n, 1.0)
    metrics["value_loss"] = (v_sum, v_n)
    metrics["value_mean"] = ((values[:, :-1] * mask).sum(), mask.sum())
    return loss_sum, denom, metrics


@runner.locked
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    r = GRPORun(config, workdir)
    return runner.drive(r, r.initial_state, summary_extra=lambda: {"rollouts": r.rollouts})
