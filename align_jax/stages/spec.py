"""What a training stage is: a `StageSpec`.

A stage differs from another only in what its train step takes (`batch`), what it minimises
(`loss_fn`), where its params start (`params`), and its data. The driver (stages/runner.py) builds the
rest the same way for every stage: tokenizer, mesh, model config (a `Context`, before the spec), then
the sharded train state, the train step, the eval step, the loop, checkpoints and the summary.

    def spec(ctx: Context) -> StageSpec: ...      # in align_jax/stages/<stage>.py
    run = runner.stage(spec)                      # run(config, workdir) -> summary

`launch/bench.py` builds any stage through the same `runner.Run(spec, config, workdir)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections

from align_jax.batch import BatchSpec
from align_jax.models.config import ModelConfig
from align_jax.sharding import Sharder
from align_jax.train.step import LossFn

# The hooks below take the driver's `runner.Run` and the current `TrainState` (typed Any here: the
# driver imports this module, not the other way round).
Run = TrainState = Any


@dataclasses.dataclass
class Context:
    """What every stage is built on, made by the driver before the stage's spec."""

    config: ml_collections.ConfigDict
    workdir: str
    tokenizer: Any
    sharder: Sharder
    model_cfg: ModelConfig


@dataclasses.dataclass
class ParamsInit:
    """A stage's params and where they start (DESIGN.md, init precedence: resume > init_from > fresh).

    `init_from_part` names the subtree that init_from's params fill when the stage's params hold more
    than a decoder (the RM: "decoder" beside a new head; PPO: "policy" beside a value model); `from_init`
    then maps init_from's params to the whole tree. With `reference`, TrainState.frozen holds init_from's
    params (of that part): the frozen reference, sharded like the policy, never updated, not checkpointed
    (it is reloaded from init_from on resume)."""

    boxed_abstract: Any  # abstract params with logical-axis metadata: the shardings come from it
    fresh: Callable[[jax.Array], Any]  # rng -> params, for a run from scratch
    init_from_part: str | None = None
    from_init: Callable[[Any], Any] | None = None
    reference: bool = False
    # The reference in buffers of its own, copied from the loaded params: DPO's policy may alias them,
    # and the step donates the state. GRPO/PPO skip the copy (a whole extra reference at start-up).
    copy_reference: bool = False


@dataclasses.dataclass
class StageSpec:
    """One stage. `loss_fn(params, batch, rng, *, frozen=None) -> (loss_sum, weight, metric sums)` (the
    step divides once); `weight_name` says what the weight counts (eval_<weight_name> in the metrics).

    Optional hooks: `next_batch(run, state)` makes each batch from the current state instead of reading
    `train_data` (GRPO's rollouts); `evaluate(run, state)` replaces the loss over `eval_data` (GRPO: the
    reward of greedy responses); `start(run, state)` runs once after init, before the first batch (DPO's
    precomputed reference log-probs); `summary()` adds to summary.json."""

    batch: BatchSpec
    loss_fn: LossFn
    params: ParamsInit
    train_data: Any  # resumable host-batch iterator: next(), state(), restore(state), stats()
    flops_per_token: Callable[[float], float]  # average causal context -> training FLOPs per token
    eval_data: Iterable | None = None
    weight_name: str = "tokens"
    next_batch: Callable[[Run, TrainState], tuple[dict, dict]] | None = None
    evaluate: Callable[[Run, TrainState], dict[str, float]] | None = None
    start: Callable[[Run, TrainState], TrainState] | None = None
    summary: Callable[[], dict] | None = None
    extra_metrics: Callable[[], dict[str, float]] | None = None
