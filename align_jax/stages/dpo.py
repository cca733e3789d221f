"""DPO family (DPO and its loss variants, SimPO, ORPO, KTO) on packed preference pairs.

Init: policy and reference are both init_from's params (an SFT workdir or HF directory). The
reference is never updated. With `dpo.reference = "in_step"` it rides in TrainState.frozen (sharded like
the policy) and runs forward inside each step; it is not stored in checkpoints (it is init_from's params,
reloaded on resume). With "precomputed" its log-probs are computed once per data split and cached on
disk (align_jax/reference.py), and the step carries no reference at all. Reference-free objectives
(SimPO, ORPO, reference_free DPO) use neither.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from align_jax import reference
from align_jax.config import resolve_data_path
from align_jax.losses.dpo import Objective, preference_loss
from align_jax.losses.pairs import sequence_logps
from align_jax.metrics import flops_per_token
from align_jax.models.config import to_hf_dict
from align_jax.models.transformer import Decoder
from align_jax.stages import build, runner
from align_jax.stages.pairs import PairRun
from align_jax.train.step import make_train_step

log = logging.getLogger(__name__)


def objective_of(config: ml_collections.ConfigDict) -> Objective:
    d = config.dpo
    return Objective(
        loss_type=d.loss_type,
        beta=float(d.beta),
        label_smoothing=float(d.label_smoothing),
        gamma=float(d.gamma),
        rpo_alpha=float(d.rpo_alpha),
        desirable_weight=float(d.desirable_weight),
        undesirable_weight=float(d.undesirable_weight),
        reference_free=bool(d.reference_free),
    )


class DPORun(PairRun):
    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        super().__init__(config, workdir)
        self.objective = objective_of(config)
        self.ref_mode = config.dpo.reference if self.objective.needs_reference else "none"
        self.model = Decoder(self.model_cfg, self.sharder)
        self.setup = build.setup_state(self.model_cfg, self.sharder, config)
        self.loss_chunk = int(config.train.loss_chunk)
        self.loss_fn = functools.partial(
            preference_loss, model=self.model, objective=self.objective, loss_chunk=self.loss_chunk
        )
        state_shardings = self.setup.state_shardings
        if self.ref_mode == "in_step":
            state_shardings = state_shardings.replace(frozen=self.setup.param_shardings)
        self.batch_shardings = self.shard_batches()
        self.step_fn = make_train_step(
            self.loss_fn,
            self.setup.optimizer,
            microbatches=int(config.train.microbatches),
            state_shardings=state_shardings,
            batch_shardings=self.batch_shardings,
        )
        ps = self.setup.param_shardings
        if self.ref_mode == "in_step":
            self.eval_step = jax.jit(
                lambda params, frozen, batch: self.loss_fn(params, batch, jax.random.key(0), frozen=frozen),
                in_shardings=(ps, ps, self.batch_shardings),
            )
        else:
            self.eval_step = jax.jit(
                lambda params, batch: self.loss_fn(params, batch, jax.random.key(0)),
                in_shardings=(ps, self.batch_shardings),
            )
        self.ref_seconds = 0.0
        self.ref_cache: dict[str, str] = {}

    def fields(self) -> tuple[str, ...]:
        extra = ("ref_logps",) if self.ref_mode == "precomputed" else ()
        return (*super().fields(), *extra)

    def eval_args(self, state: Any) -> tuple:
        return (state.params, state.frozen) if self.ref_mode == "in_step" else (state.params,)

    # -- the reference -----------------------------------------------------------------------------

    def with_reference(self, state: Any) -> Any:
        """Attaches what the objective needs of the reference: its params (in_step) or its cached
        log-probs on every batch (precomputed)."""
        if self.ref_mode == "in_step":
            ref = build.init_from_params(self.setup, self.config)
            # Separate buffers: the step donates the state, and the policy may still alias init_from's arrays.
            return state.replace(frozen=jax.tree.map(lambda x: x.copy(), ref))
        if self.ref_mode == "precomputed":
            self.attach_precomputed()
        return state

    def reference_logps_fn(self):
        """jit (params, batch without ref_logps) -> [B, 2P] response log-prob sums: what the cache holds."""
        return jax.jit(
            lambda p, b: sequence_logps(p, b, model=self.model, loss_chunk=self.loss_chunk)[0],
            in_shardings=(self.setup.param_shardings, self.setup.batch_shardings(super().fields())),
        )

    def cache_key(self) -> str:
        c = self.config
        settings = {k: self.data_cfg.get(k) for k in ("format", "seq_len", "over_long", "unpaired")}
        return reference.cache_key(
            tokenizer=reference.tokenizer_fingerprint(self.tokenizer),
            settings=settings,
            reference=reference.reference_fingerprint(c.init_from, int(c.seed), to_hf_dict(self.model_cfg)),
            dtype=(self.model_cfg.param_dtype, self.model_cfg.dtype),
        )

    def attach_precomputed(self) -> None:
        from align_jax.data import preference

        key = self.cache_key()
        logps_fn = None
        splits = [("train", self.config.data.train)]
        if self.eval_batches is not None:
            splits.append(("eval", self.config.data.eval))
        tables = {}
        units = 2 if self.config.data.unpaired else 1
        for split, spec in splits:
            split_key = reference.cache_key(base=key, data=reference.data_fingerprint(resolve_data_path(spec)))
            path = reference.cache_path(self.config.dpo.ref_cache_dir, split_key, split)
            table = reference.load_table(path)
            if table is None:
                if logps_fn is None:
                    t0 = time.perf_counter()
                    ref_params = build.init_from_params(self.setup, self.config)
                    logps_fn = functools.partial(self.reference_logps_fn(), ref_params)
                    self.ref_seconds -= t0 - time.perf_counter()
                t0 = time.perf_counter()
                batches = preference.make_preference_iterator(
                    self.data_cfg, self.tokenizer, split=f"all_{split}", score_stats=self.score_stats
                )
                table = reference.compute_table(batches, batches.num_rows, logps_fn, self.global_batch, units)
                reference.save_table(path, table)
                self.ref_seconds += time.perf_counter() - t0
                log.info("dpo: reference log-probs of the %s split cached in %s", split, path)
            else:
                log.info("dpo: reference log-probs of the %s split from the cache %s", split, path)
            tables[split] = table
            self.ref_cache[split] = os.path.abspath(path)
        self.train_iter = reference.WithReference(self.train_iter, tables["train"], self.config.data.train, units)
        if self.eval_batches is not None:
            self.eval_batches = reference.WithReference(self.eval_batches, tables["eval"], self.config.data.eval, units)

    def flops_per_token(self, avg_context: float) -> float:
        f = flops_per_token(self.model_cfg, avg_context)
        if self.ref_mode == "in_step":
            f += flops_per_token(self.model_cfg, avg_context, backward=False)
        return f


@runner.locked
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    r = DPORun(config, workdir)

    def init(checkpointer):
        state, data_state, how = build.initial_state(r.setup, config, checkpointer, workdir)
        return r.with_reference(state), data_state, how

    return runner.drive(r, init, summary_extra={**r.summary_extra(), "reference": r.ref_mode, "ref_cache": r.ref_cache})
