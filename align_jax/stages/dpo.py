"""DPO family (DPO and its loss variants, SimPO, ORPO, KTO) on packed preference pairs.

Init: policy and reference are both init_from's params (an SFT workdir or HF directory). The
reference is never updated. With `reference = "in_step"` (`dpo.reference` in a pipeline) it rides in
TrainState.frozen (sharded like the policy) and runs forward inside each step; it is not stored in
checkpoints (it is init_from's params, reloaded on resume). With "precomputed" its log-probs are computed
once per data split and cached on disk (align_jax/reference.py), and the step carries no reference at
all. Reference-free objectives (SimPO, ORPO, reference_free DPO) use neither.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections

from align_jax import reference
from align_jax.batch import PAIR_BATCH, REFERENCE_LOGPS, BatchSpec
from align_jax.lora import model_apply_fn
from align_jax.losses.dpo import Objective, preference_loss
from align_jax.losses.pairs import sequence_logps
from align_jax.metrics import flops_per_token
from align_jax.models.hf_config import to_hf_dict
from align_jax.models.transformer import Decoder
from align_jax.stages import build, runner
from align_jax.stages.pairs import PairData, pair_data
from align_jax.stages.spec import Context, StageSpec
from align_jax.workdir import resolve_data_path

log = logging.getLogger(__name__)


def objective_of(config: ml_collections.ConfigDict) -> Objective:
    d = config
    return Objective(
        loss_type=d.loss_type,
        beta=float(d.beta),
        label_smoothing=float(d.label_smoothing),
        gamma=float(d.gamma),
        rpo_alpha=float(d.rpo_alpha),
        desirable_weight=float(d.desirable_weight),
        undesirable_weight=float(d.undesirable_weight),
        reference_free=bool(d.reference_free),
        bco_shift=d.bco_shift,
        discopop_tau=float(d.discopop_tau),
    )


def reference_mode(config: ml_collections.ConfigDict) -> str:
    """in_step | precomputed | none (a reference-free objective)."""
    return config.reference if objective_of(config).needs_reference else "none"


def reference_logps_fn(run: runner.Run):
    """jit (params, batch without ref_logps) -> [B, 2P] response log-prob sums: what the cache holds."""
    loss_chunk = int(run.config.train.loss_chunk)
    return jax.jit(
        lambda p, b: sequence_logps(
            p, b, apply_fn=model_apply_fn(Decoder(run.model_cfg, run.sharder)), loss_chunk=loss_chunk
        )[0],
        in_shardings=(run.reference_shardings, PAIR_BATCH.shardings(run.sharder)),
    )


@dataclasses.dataclass
class PrecomputedReference:
    """`reference = "precomputed"`: the reference's log-probs of every train and eval pair, computed
    once (or read from the cache) when the run starts, then attached to each batch as `ref_logps`."""

    data: PairData
    seconds: float = 0.0
    cache: dict[str, str] = dataclasses.field(default_factory=dict)

    def cache_key(self, run: runner.Run) -> str:
        c, cfg = run.config, run.model_cfg
        settings = {k: self.data.cfg.get(k) for k in ("format", "seq_len", "over_long", "unpaired")}
        return reference.cache_key(
            tokenizer=reference.tokenizer_fingerprint(run.tokenizer),
            settings=settings,
            reference=reference.reference_fingerprint(c.init_from, int(c.seed), to_hf_dict(cfg)),
            dtype=(cfg.param_dtype, cfg.dtype),
            # QLoRA's reference is the NF4 base: other log-probs than the unquantised model's.
            **(
                {"quantize": (c.lora.quantize, c.lora.block_size)}
                if cfg.lora_rank and c.lora.quantize != "none"
                else {}
            ),
        )

    def table(self, run: runner.Run, split: str, spec: str, key: str, logps_fn: list) -> Any:
        """The split's cached table, or computed now (the reference params are loaded on first need)."""
        from align_jax.data import preference

        split_key = reference.cache_key(base=key, data=reference.data_fingerprint(resolve_data_path(spec)))
        path = reference.cache_path(run.config.ref_cache_dir, split_key, split)
        self.cache[split] = os.path.abspath(path)
        table = reference.load_table(path)
        if table is not None:
            log.info("dpo: reference log-probs of the %s split from the cache %s", split, path)
            return table
        t0 = time.perf_counter()
        if not logps_fn:
            logps_fn.append(functools.partial(reference_logps_fn(run), run.reference_params()))
        batches = preference.make_preference_iterator(
            self.data.cfg, run.tokenizer, split=f"all_{split}", score_stats=self.data.score_stats
        )
        units = 2 if run.config.data.unpaired else 1
        table = reference.compute_table(batches, batches.num_rows, logps_fn[0], run.global_batch, units)
        reference.save_table(path, table)
        self.seconds += time.perf_counter() - t0
        log.info("dpo: reference log-probs of the %s split cached in %s", split, path)
        return table

    def start(self, run: runner.Run, state: Any) -> Any:
        key, logps_fn, c = self.cache_key(run), [], run.config
        units = 2 if c.data.unpaired else 1
        table = self.table(run, "train", c.data.train, key, logps_fn)
        run.train_iter = reference.WithReference(run.train_iter, table, c.data.train, units)
        if run.eval_batches is not None:
            table = self.table(run, "eval", c.data.eval, key, logps_fn)
            run.eval_batches = reference.WithReference(run.eval_batches, table, c.data.eval, units)
        return state


def spec(ctx: Context) -> StageSpec:
    c = ctx.config
    objective, mode = objective_of(c), reference_mode(c)
    data = pair_data(ctx)
    params = build.decoder_params(ctx)
    params.reference = params.copy_reference = mode == "in_step"
    loss = functools.partial(
        preference_loss,
        apply_fn=model_apply_fn(Decoder(ctx.model_cfg, ctx.sharder)),
        objective=objective,
        loss_chunk=int(c.train.loss_chunk),
    )
    precomputed = PrecomputedReference(data) if mode == "precomputed" else None

    def flops(avg_context: float) -> float:
        f = flops_per_token(ctx.model_cfg, avg_context)
        if mode == "in_step":  # + the reference's forward
            f += flops_per_token(ctx.model_cfg, avg_context, backward=False)
        return f

    def summary() -> dict:
        return {**data.summary(), "reference": mode, "ref_cache": precomputed.cache if precomputed else {}}

    return StageSpec(
        batch=BatchSpec.of(PAIR_BATCH.fields, REFERENCE_LOGPS) if precomputed else PAIR_BATCH,
        loss_fn=loss,
        params=params,
        train_data=data.train,
        eval_data=data.eval,
        flops_per_token=flops,
        weight_name="pairs",
        start=precomputed.start if precomputed else None,
        summary=summary,
    )


run = runner.stage(spec)
