"""What every training stage does around its step: the checkpointer, the data feed, the metrics writer,
the loop, and the summary. A stage supplies a `StageRun` (its model, loss, step, data) and its init."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np

from align_jax import checkpoint
from align_jax import workdir as workdir_files
from align_jax.config import resolve_data_path, validate
from align_jax.data import pipeline
from align_jax.data.prefetch import Prefetcher
from align_jax.data.sources import check_local_files
from align_jax.metrics import MetricsWriter
from align_jax.stages import build
from align_jax.train import loop
from align_jax.train.step import finalize_metrics

log = logging.getLogger(__name__)


class StageRun:
    """The parts of a run the shared driver reads. Subclasses set, in __init__: config, workdir,
    model_cfg, setup, step_fn, batch_shardings, train_iter, eval_batches (or None), and `eval_step`
    (*eval_args(state), batch) -> (loss_sum, weight, metric sums)."""

    config: ml_collections.ConfigDict
    workdir: str
    model_cfg: Any
    setup: build.StateSetup
    step_fn: Callable
    batch_shardings: dict
    train_iter: Any
    eval_batches: Iterable | None = None
    eval_step: Callable | None = None
    weight_name: str = "weight"  # what the loss's denominator counts: eval_<weight_name> in the metrics

    def start_feed(self) -> None:
        """Starts preparing batches in the background (after any restore of the iterator)."""
        self.feed = Prefetcher(self.train_iter)

    def global_batch(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return pipeline.global_batch(host, self.batch_shardings["tokens"])

    def next_batch(self) -> tuple[dict[str, jax.Array], dict]:
        host = next(self.feed)
        return self.global_batch(host), loop.batch_stats(host)

    def eval_args(self, state: Any) -> tuple:
        """What `eval_step` takes before the batch: the params (DPO adds its frozen reference)."""
        return (state.params,)

    def evaluate(self, state: Any) -> dict[str, float]:
        """The loss and metrics over the eval split (or `data.eval_batches` batches of it), summed over
        batches then divided once."""
        limit = int(self.config.data.eval_batches) or None
        loss_sum, weight, sums = 0.0, 0.0, {}
        args = self.eval_args(state)
        for i, host in enumerate(self.eval_batches):
            if limit is not None and i >= limit:
                break
            ls, w, metrics = jax.device_get(self.eval_step(*args, self.global_batch(host)))
            loss_sum, weight = loss_sum + float(ls), weight + float(w)
            for k, v in metrics.items():
                old = sums.get(k, (0.0,) * len(v))
                sums[k] = tuple(a + float(b) for a, b in zip(old, v, strict=True))
        out = {"eval_loss": loss_sum / max(weight, 1e-9), f"eval_{self.weight_name}": weight}
        out.update({f"eval_{k}": float(v) for k, v in finalize_metrics(sums).items()})
        return out

    def flops_per_token(self, avg_context: float) -> float:
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        return {f"data/{k}": v for k, v in self.train_iter.stats().items() if isinstance(v, int | float)}


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
DATA_KEYS = ("data.train", "data.eval", "grpo.ptx_data", "pas.prompts")


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
            section, name = key.split(".")
            spec = c[section][name] if section in c and name in c[section] else ""
            if spec:
                check_local_files(resolve_data_path(spec), prefix + key)


def drive(
    r: StageRun,
    initial_state: Callable[[checkpoint.Checkpointer], tuple[Any, dict, str]],
    *,
    summary_extra: dict | Callable[[], dict] | None = None,
) -> dict:
    """Initialises (resume / init_from / scratch), trains to config.train.steps, writes summary.json."""
    config, workdir, tc = r.config, r.workdir, r.config.train
    checkpointer = checkpoint.Checkpointer(
        workdir, keep=int(tc.keep), best_metric=tc.best_metric or None, async_save=bool(tc.async_checkpoint)
    )
    config_json = build.saved_config(config, r.model_cfg)
    try:
        if checkpointer.latest_step() is not None:
            checkpoint.check_resume(checkpointer, config_json)
        state, data_state, how = initial_state(checkpointer)
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
    hooks = loop.LoopHooks(
        step_fn=r.step_fn,
        next_batch=r.next_batch,
        data_state=lambda: pipeline.gather_host_states(r.feed.state()),
        evaluate=r.evaluate if r.eval_batches is not None else None,
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
    extra = summary_extra() if callable(summary_extra) else summary_extra
    summary.update(init=how, n_params=r.model_cfg.num_params(), data=r.train_iter.stats(), **(extra or {}))
    if jax.process_index() == 0:
        workdir_files.write_summary(workdir, summary)
    return summary
