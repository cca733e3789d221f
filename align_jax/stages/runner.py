"""The driver: what every training stage does around its spec (stages/spec.py). `Run` builds the
context, the sharded state, the train and eval steps; `drive` initialises, feeds, loops, checkpoints and
writes the summary; `stage(spec)` is a stage module's `run(config, workdir)`, under the workdir lock."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from align_jax import checkpoint
from align_jax import workdir as workdir_files
from align_jax.config import validate
from align_jax.data import pipeline
from align_jax.data.prefetch import Prefetcher
from align_jax.data.sources import check_local_files
from align_jax.lora.plan import LoraPlan
from align_jax.losses.router_aux import with_router_aux
from align_jax.metrics import MetricsWriter
from align_jax.stages import build
from align_jax.stages.spec import Context, StageSpec
from align_jax.train import loop
from align_jax.train.step import finalize_metrics, make_eval_step, make_train_step
from align_jax.workdir import resolve_data_path

log = logging.getLogger(__name__)


class Run:
    """A stage built for training: its spec and what the driver makes of it the same way for every stage
    (the sharded state's layout, the train step, the eval step). `launch/bench.py` builds one too."""

    def __init__(self, make_spec: Callable[[Context], StageSpec], config: ml_collections.ConfigDict, workdir: str):
        validate(config)  # also when built outside `stage` (bench, tools): a bad config fails before any work
        self.config, self.workdir = config, workdir
        self.ctx = build.context(config, workdir)
        self.tokenizer, self.sharder, self.model_cfg = self.ctx.tokenizer, self.ctx.sharder, self.ctx.model_cfg
        self.spec = spec = make_spec(self.ctx)
        # LoRA: the state's params are the trainable tree, its frozen the base (align_jax/lora/plan.py).
        self.lora = LoraPlan(spec.params, self.model_cfg, self.sharder, config) if self.model_cfg.lora_rank else None
        boxed = spec.params.boxed_abstract if self.lora is None else self.lora.boxed_trainable
        self.setup = build.setup_state(self.model_cfg, self.sharder, config, boxed_abstract=boxed)
        self.state_shardings = self.setup.state_shardings
        if self.lora is not None:
            self.state_shardings = self.state_shardings.replace(frozen=self.lora.frozen_shardings)
        elif spec.params.reference:
            self.state_shardings = self.state_shardings.replace(frozen=self._part(self.setup.param_shardings))
        self.batch_shardings = spec.batch.shardings(self.sharder)
        if jax.process_count() > 1:  # each process's loader rows must be the batch rows its devices hold
            shape = (int(config.data.batch_size), int(config.data.seq_len))
            pipeline.host_rows(self.batch_shardings["tokens"], shape)
        if self.model_cfg.num_experts:  # routed experts: their load-balancing loss joins every stage's loss
            spec.loss_fn = with_router_aux(spec.loss_fn, self.model_cfg.router_aux_loss_coef)
        eval_loss = spec.loss_fn
        if self.lora is not None:  # outermost: the losses inside see full params (router aux included)
            spec.loss_fn, eval_loss = (
                self.lora.loss(spec.loss_fn, train=True),
                self.lora.loss(spec.loss_fn, train=False),
            )
        self.step_fn = make_train_step(
            spec.loss_fn,
            self.setup.optimizer,
            microbatches=int(config.train.microbatches),
            state_shardings=self.state_shardings,
            batch_shardings=self.batch_shardings,
        )
        self.eval_step = make_eval_step(
            eval_loss, state_shardings=self.state_shardings, batch_shardings=self.batch_shardings
        )
        self.train_iter, self.eval_batches = spec.train_data, spec.eval_data
        self.feed: Any = None

    def _part(self, tree: Any) -> Any:
        part = self.spec.params.init_from_part
        return tree if part is None else tree[part]

    # -- state ---------------------------------------------------------------------------------------

    def initial_state(
        self, checkpointer: checkpoint.Checkpointer | None, *, start: bool = True
    ) -> tuple[Any, dict, str]:
        """The init precedence with this stage's shardings, then its frozen reference and (with `start`)
        the stage's start hook."""
        p = self.spec.params
        if self.lora is not None:  # the frozen base (which is also the reference) comes with it
            state, data_state, how = self.lora.initial_state(self, checkpointer)
        else:
            state, data_state, how = build.initial_state(
                self.setup,
                self.config,
                checkpointer,
                self.workdir,
                fresh_params=p.fresh,
                init_abstract_params=None if p.init_from_part is None else self._part(self.setup.abstract_params),
                params_from_init=p.from_init,
            )
        if p.reference and self.lora is None:
            reference = self.reference_params()
            if p.copy_reference:
                reference = jax.tree.map(lambda x: x.copy(), reference)
            state = state.replace(frozen=reference)
        if start and self.spec.start is not None:
            state = self.spec.start(self, state)
        return state, data_state, how

    def reference_params(self) -> Any:
        """init_from's params (or the seeded fresh init) in the param shardings: the frozen reference. Under
        LoRA the frozen base, loaded anew (the reference is the base with adapters off)."""
        if self.lora is not None:
            return self.lora.frozen()
        s = self.setup
        return build.init_from_params(s, self.config, self._part(s.abstract_params), self._part(s.param_shardings))

    @property
    def reference_shardings(self) -> Any:
        return self.lora.frozen_shardings if self.lora is not None else self._part(self.setup.param_shardings)

    # -- data ----------------------------------------------------------------------------------------

    def start_feed(self) -> None:
        """Starts preparing batches in the background (after any restore of the iterator). Rollouts are
        not prefetched: each needs the params of the step before it."""
        self.feed = Prefetcher(self.train_iter) if self.spec.next_batch is None else _Unbuffered(self.train_iter)

    def global_batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of a batch -> global arrays, batch over the data axes."""
        return pipeline.global_batch(host, self.batch_shardings["tokens"])

    def next_batch(self, state: Any) -> tuple[dict[str, jax.Array], dict]:
        if self.spec.next_batch is not None:
            return self.spec.next_batch(self, state)
        host = next(self.feed)
        return self.global_batch(host), loop.batch_stats(host)

    # -- eval and reporting ----------------------------------------------------------------------------

    def evaluate(self, state: Any) -> dict[str, float]:
        """The loss and metrics over the eval split (or `data.eval_batches` batches of it), summed over
        batches then divided once; or the stage's own evaluation."""
        if self.spec.evaluate is not None:
            return self.spec.evaluate(self, state)
        limit = int(self.config.data.eval_batches) or None
        loss_sum, weight, sums = 0.0, 0.0, {}
        for i, host in enumerate(self.eval_batches):
            if limit is not None and i >= limit:
                break
            ls, w, metrics = jax.device_get(self.eval_step(state, self.global_batch(host)))
            loss_sum, weight = loss_sum + float(ls), weight + float(w)
            for k, v in metrics.items():
                old = sums.get(k, (0.0,) * len(v))
                sums[k] = tuple(a + float(b) for a, b in zip(old, v, strict=True))
        out = {"eval_loss": loss_sum / max(weight, 1e-9), f"eval_{self.spec.weight_name}": weight}
        out.update({f"eval_{k}": float(v) for k, v in finalize_metrics(sums).items()})
        return out

    def flops_per_token(self, avg_context: float) -> float:
        return self.spec.flops_per_token(avg_context)

    def extra_metrics(self) -> dict[str, float]:
        out = self.spec.extra_metrics() if self.spec.extra_metrics is not None else {}
        out.update({f"data/{k}": v for k, v in self.train_iter.stats().items() if isinstance(v, int | float)})
        return out


class _Unbuffered:
    """The feed of a stage that makes its own batches: only the iterator's state is read through it."""

    def __init__(self, data: Any):
        self.data = data

    def state(self) -> dict:
        return self.data.state()

    def close(self) -> None:
        pass


def stage(
    make_spec: Callable[[Context], StageSpec], *, check: Callable[[ml_collections.ConfigDict, str], None] | None = None
) -> Callable[[ml_collections.ConfigDict, str], dict]:
    """A stage module's `run(config, workdir) -> summary`: its spec, built and driven under the workdir lock."""

    @locked(check=check)
    def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
        return drive(Run(make_spec, config, workdir))

    run.__doc__ = f"Trains the stage of `{make_spec.__module__}.spec` in `workdir`; returns its summary."
    return run


def locked(
    run: Callable[[ml_collections.ConfigDict, str], dict] | None = None,
    *,
    check: Callable[[ml_collections.ConfigDict, str], None] | None = None,
):
    """A stage's `run(config, workdir)` that validates the config, then holds the workdir's exclusive lock
    (align_jax/workdir.py) for the whole run: a second run on the same workdir fails at once naming the
    first, instead of both writing into it. Config, inputs and the stage's own `check(config, workdir)` come
    first: a typo leaves no workdir. `@locked` or `@locked(check=...)`."""
    if run is None:
        return functools.partial(locked, check=check)

    @functools.wraps(run)
    def wrapper(config: ml_collections.ConfigDict, workdir: str) -> dict:
        validate(config)
        check_inputs(config)
        if check is not None:
            check(config, workdir)
        with workdir_files.lock(workdir):
            return run(config, workdir)

    return wrapper


# Where a stage config names data files (read by its stage, so checked before the run starts).
DATA_KEYS = ("data.train", "data.eval", "ptx_data", "prompts")


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """The paths a run reads exist and hold what is expected: init_from, and every local data file."""
    if config.get("init_from"):
        checkpoint.init_from_kind(config.init_from)
    # A pipeline's stages are checked up front too (their init_from are earlier stages: checked as they run).
    configs = [(config, "")]
    if config.stage == "pipeline":
        names = [n.strip() for n in str(config.stages).split(",")]
        configs += [(config[n], f"{n}.") for n in names if n in config and "stage" in config[n]]
    for c, prefix in configs:
        for key in DATA_KEYS:
            section, _, name = key.rpartition(".")
            holder = c[section] if section and section in c else (c if not section else None)
            spec = holder[name] if holder is not None and name in holder else ""
            if spec:
                check_local_files(resolve_data_path(spec), prefix + key)


def drive(r: Run) -> dict:
    """Initialises (resume / init_from / scratch), trains to config.train.steps, writes summary.json."""
    config, workdir, tc = r.config, r.workdir, r.config.train
    checkpointer = checkpoint.Checkpointer(
        workdir, keep=int(tc.keep), best_metric=tc.best_metric or None, async_save=bool(tc.async_checkpoint)
    )
    config_json = build.saved_config(config, r.model_cfg)
    try:
        if checkpointer.latest_step() is not None:
            checkpoint.check_resume(checkpointer, config_json)
        state, data_state, how = r.initial_state(checkpointer)
        if data_state:
            r.train_iter.restore(pipeline.host_state(data_state))
        r.start_feed()
    except BaseException:
        checkpointer.close()
        raise
    start = int(jax.device_get(state.step))
    log.info("%s: %s; %.1fM params; starting at step %d", config.stage, how, r.model_cfg.num_params() / 1e6, start)
    writer = MetricsWriter(
        workdir, tensorboard=bool(config.metrics.tensorboard), wandb_project=config.metrics.wandb_project or None
    )
    writer.truncate_after(start)
    evaluates = r.eval_batches is not None or r.spec.evaluate is not None
    hooks = loop.LoopHooks(
        step_fn=r.step_fn,
        next_batch=r.next_batch,
        data_state=lambda: pipeline.gather_host_states(r.feed.state()),
        evaluate=r.evaluate if evaluates else None,
        flops_per_token=r.flops_per_token,
        config_json=config_json,
        learning_rate=r.setup.schedule,
        extra_metrics=r.extra_metrics,
    )
    loop_cfg = loop.LoopConfig(
        total_steps=int(tc.steps),
        log_every=int(tc.log_every),
        eval_every=int(tc.eval_every),
        ckpt_every=int(tc.ckpt_every),
        progress=bool(tc.progress),
        peak_flops=float(tc.peak_flops),
    )
    try:
        state, summary = loop.run(
            state, start_step=start, cfg=loop_cfg, hooks=hooks, checkpointer=checkpointer, writer=writer
        )
    finally:
        r.feed.close()
        checkpointer.close()
        writer.close()
    extra = r.spec.summary() if r.spec.summary is not None else {}
    summary.update(init=how, n_params=r.model_cfg.num_params(), data=r.train_iter.stats(), **extra)
    if r.lora is not None:
        summary["lora"] = r.lora.summary(r.setup.abstract_state)
    if jax.process_index() == 0:
        workdir_files.write_summary(workdir, summary)
    return summary
