"""A LoRA run's state: what the driver (stages/runner.py) builds differently when config.lora.rank > 0.

    TrainState.params   = the trainable tree (adapters; the RM's head; PPO's whole value model)
    TrainState.opt_state  exists for those alone
    TrainState.frozen   = the base (the init_from part without adapters), NF4 projection kernels with
                          quantize="nf4", kernels and embeddings in the compute dtype; sharded like the
                          params (NF4 codes and scales like their kernel on every axis they keep whole)

The frozen base is never differentiated and never in a checkpoint: a checkpoint holds the trainable tree
and its optimizer state, and a resumed run reloads the base from init_from (or the seeded fresh init)
and quantises it again (deterministic), as the DPO reference always was. DPO/GRPO's reference IS that
base, run with adapters off (lora/apply.py): one copy of the weights serves policy and reference.

PPO: adapters on the policy only; the value model (init_from's decoder + a scalar head) is trained in
full, as without LoRA.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import ml_collections
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from align_jax import checkpoint
from align_jax.lora import tree
from align_jax.lora.apply import adapter_loss
from align_jax.lora.handoff import fresh_base
from align_jax.models.config import ModelConfig
from align_jax.models.nf4 import NF4
from align_jax.sharding import Sharder, tree_shardings
from align_jax.train.step import LossFn


def _fit(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """The kernel's sharding for an NF4 leaf of `shape`: the same on the leading axes; the last axis (now
    bytes or blocks) keeps its mesh axes only where they still divide it."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    last = spec[-1]
    axes = (last,) if isinstance(last, str) else tuple(last or ())
    if shape[-1] % math.prod(sharding.mesh.shape[a] for a in axes):
        spec[-1] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def frozen_shardings(frozen_abstract: Any, plain_shardings: Any) -> Any:
    """Shardings of the frozen base: NF4 leaves take their kernel's (fitted to their own shapes)."""

    def one(leaf, sharding):
        if isinstance(leaf, NF4):
            return leaf.replace(codes=_fit(sharding, leaf.codes.shape), scales=_fit(sharding, leaf.scales.shape))
        return sharding

    return jax.tree.map(one, frozen_abstract, plain_shardings, is_leaf=lambda x: isinstance(x, NF4))


def load_base(config: ml_collections.ConfigDict, cfg: ModelConfig, sharder: Sharder, like: Any, shardings: Any) -> Any:
    """init_from's params (an HF directory or a workdir, a LoRA workdir merged: checkpoint.restore_params)
    at the paths of `like`, in `shardings`; without init_from the seeded fresh init."""
    if not config.init_from:
        return fresh_base(cfg, sharder, int(config.seed), like, shardings)
    if checkpoint.is_hf_dir(config.init_from):
        from align_jax.models.hf import load_pretrained

        _, params = load_pretrained(config.init_from, dtype=cfg.param_dtype, compute_dtype=cfg.dtype, sharder=sharder)
        return tree.select(params, like)
    return checkpoint.restore_params(
        config.init_from, checkpoint.abstract_with_shardings(like, shardings), sharder=sharder
    )


class LoraPlan:
    """Splits a stage's params (`ParamsInit`) into trainable and frozen, and builds both halves."""

    def __init__(self, params: Any, cfg: ModelConfig, sharder: Sharder, config: ml_collections.ConfigDict):
        self.cfg, self.sharder, self.config = cfg, sharder, config
        self.params, self.part = params, params.init_from_part
        self.quantize, self.block_size = str(config.lora.quantize), int(config.lora.block_size)
        self.boxed_trainable, boxed_base = tree.split(params.boxed_abstract, self.part)
        self.trainable_shardings = tree_shardings(self.boxed_trainable, sharder)
        self.base_shardings = tree_shardings(boxed_base, sharder)
        self.base_abstract = nn.meta.unbox(boxed_base)  # the unquantised base: what init_from is read as
        self._freeze_fn = functools.partial(
            tree.frozen_base,
            quantize=self.quantize,
            block_size=self.block_size,
            param_dtype=cfg.param_dtype,
            compute_dtype=cfg.dtype,
        )
        self.frozen_abstract = jax.eval_shape(self._freeze_fn, self.base_abstract)
        self.frozen_shardings = frozen_shardings(self.frozen_abstract, self.base_shardings)
        # Nothing to convert (no NF4, no narrower compute dtype): the loaded base is kept as it is.
        self._identity = jax.tree.structure(self.frozen_abstract) == jax.tree.structure(self.base_abstract) and all(
            a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(self.frozen_abstract), jax.tree.leaves(self.base_abstract), strict=True)
        )

    # -- the two halves -------------------------------------------------------------------------------

    def freeze(self, base: Any) -> Any:
        """The loaded base as the run keeps it (quantised, kernels in the compute dtype)."""
        if self._identity:
            return base
        return jax.jit(self._freeze_fn, out_shardings=self.frozen_shardings)(base)

    def load_base(self) -> Any:
        return load_base(self.config, self.cfg, self.sharder, self.base_abstract, self.base_shardings)

    def frozen(self) -> Any:
        """The frozen base, loaded and converted now (the start of a run; DPO's precomputed reference)."""
        return self.freeze(self.load_base())

    def trainable_from_base(self, base: Any) -> Any:
        """Fresh adapters (seeded; B = 0) on `base`, through the stage's own init_from mapping (the RM adds a
        fresh head, PPO a value model copied from the adapted decoder), cut down to the trainable tree."""
        seed, part, fresh = int(self.config.seed), self.part, self.params.fresh
        flat_sh = tree.flatten(self.trainable_shardings)
        adapters_sh = {p: s for p, s in flat_sh.items() if tree.is_adapter(p) and (part is None or p[0] == part)}

        def adapters(rng):  # only the adapter leaves are outputs: XLA drops the rest of the init
            flat = tree.flatten(fresh(rng))
            return tree.unflatten({p: flat[p] for p in adapters_sh})

        made = jax.jit(adapters, out_shardings=tree.unflatten(adapters_sh))(jax.random.key(seed))
        made = made[part] if part is not None else made
        full = tree.merge(made, base)
        if self.params.from_init is not None:
            full = self.params.from_init(full)
        trainable, _ = tree.split(full, part)
        # Buffers of their own: PPO's value model starts as the base's arrays, which stay frozen, and the
        # step donates the state (frozen included).
        return jax.tree.map(lambda x: x.copy(), jax.device_put(trainable, self.trainable_shardings))

    def initial_state(self, run: Any, checkpointer: checkpoint.Checkpointer | None) -> tuple[Any, dict, str]:
        """The init precedence (checkpoint.initialize) for the trainable half, then the frozen base: loaded
        once from init_from for a new run, again on resume (the checkpoint does not hold it)."""
        setup, config = run.setup, self.config
        loaded: dict[str, Any] = {}
        make_state = jax.jit(setup.make_state, out_shardings=setup.state_shardings)

        def from_base(base: Any) -> Any:
            loaded["base"] = base = tree.select(base, self.base_abstract)
            return make_state(self.trainable_from_base(base))

        state, data_state, how = checkpoint.initialize(
            run.workdir,
            checkpointer,
            abstract_state=setup.abstract_state,
            init_from=config.init_from or None,
            fresh_state=lambda: from_base(self.load_base()),
            state_from_params=from_base,
            abstract_params=checkpoint.abstract_with_shardings(self.base_abstract, self.base_shardings),
            model_cfg=self.cfg,
            sharder=self.sharder,
        )
        base = loaded.pop("base", None)
        frozen = self.freeze(base) if base is not None else self.frozen()
        return state.replace(frozen=frozen), data_state, how

    # -- the loss -------------------------------------------------------------------------------------

    def loss(self, loss_fn: LossFn, *, train: bool) -> LossFn:
        """The stage's loss over the trainable tree (see lora/apply.adapter_loss)."""
        dropout = train and self.cfg.lora_dropout > 0
        return adapter_loss(loss_fn, part=self.part, reference=self.params.reference, dropout=dropout)

    def summary(self, abstract_state: Any) -> dict:
        """The run's LoRA settings and sizes (from shapes): what summary.json records."""
        cfg = self.cfg
        return {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha,
            "targets": list(cfg.lora_targets),
            "quantize": self.quantize,
            "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
            "trainable_bytes": tree.nbytes(abstract_state.params),
            "opt_state_bytes": tree.nbytes(abstract_state.opt_state),
            "frozen_bytes": tree.nbytes(self.frozen_abstract),
        }
