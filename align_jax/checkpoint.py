"""Orbax checkpoints, the init precedence, and the handoff between stages.

A checkpoint step holds three items: `state` (the whole TrainState: params, optimizer, step, rng),
`data` (the data iterator's position, JSON) and `config` (the run's config, JSON, for the record and
for export). Saves are asynchronous; Orbax writes each step into a temporary directory and renames it
into place, so a crash mid-save never leaves a checkpoint that looks complete.

Init precedence (the only place it is decided):
  1. this workdir's latest checkpoint: everything (params, optimizer, data position, rng);
  2. else `config.init_from`: an HF directory or a previous stage's workdir, params only;
  3. else a fresh init.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from align_jax.models.config import ModelConfig, from_hf_dict, read_hf_config
from align_jax.sharding import Sharder

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` that knows our three items."""

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        policies = ocp.checkpoint_managers
        keep_policy = policies.LatestN(n=keep)
        if best_metric:
            # The last `keep` steps, plus the best one by `best_metric` (BestN keeps the top of an
            # ascending sort, so "min" sorts descending).
            best = policies.BestN(
                get_metric_fn=lambda m: m[best_metric],
                reverse=best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            keep_policy = policies.AnyPreservationPolicy([keep_policy, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep_policy,
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, config: dict, metrics: dict | None = None) -> None:
        """Saves everything but a frozen reference (DPO/GRPO): that is init_from's params, which the stage
        reloads on resume, so storing it would double every checkpoint for nothing."""
        if getattr(state, "frozen", None) is not None:
            state = state.replace(frozen=None)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores (state, data_state, config) into the shardings of `abstract_state`."""
        step = self.manager.latest_step() if step is None else step
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        return out.state, dict(out.data or {}), dict(out.config or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_step_on_disk(workdir: str) -> int | None:
    """A workdir's latest finished checkpoint step, read from the step directories' names (Orbax's
    in-progress saves have non-numeric names), without opening a checkpoint manager; None if none."""
    directory = checkpoint_dir(workdir)
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


def read_config(workdir: str, step: int | None = None) -> dict:
    """The config saved with a workdir's checkpoint (latest by default)."""
    with ocp.CheckpointManager(checkpoint_dir(workdir)) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}: no checkpoint under {checkpoint_dir(workdir)}")
        out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config)


def restore_params(workdir: str, abstract_params: Any, step: int | None = None, key: str = "params") -> Any:
    """Params only, from a stage workdir's checkpoint, into the shardings of `abstract_params`.

    The optimizer state and everything else in the checkpoint are not read."""
    directory = checkpoint_dir(workdir)
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"init_from={workdir}: no checkpoint under {directory}")
        target = {key: abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
        return mngr.restore(step, args=args).state[key]


def decoder_key(saved: dict) -> str | None:
    """Where a workdir's causal-LM params sit inside its params tree: at the top (SFT, DPO, GRPO, merge),
    under 'policy' (PPO keeps policy and value side by side), or nowhere (a reward model)."""
    config = saved.get("config", {})
    if config.get("stage") == "rm":
        return None
    if config.get("stage") == "grpo" and config.get("grpo", {}).get("algorithm") == "ppo":
        return "policy"
    return ""


def restore_decoder_params(workdir: str, abstract_params: Any, step: int | None = None) -> Any:
    """A stage workdir's causal-LM params (the policy's, for PPO) into the shardings of `abstract_params`."""
    key = decoder_key(read_config(workdir, step))
    if key is None:
        raise ValueError(f"{workdir} holds a reward model (decoder + scalar head), not a causal LM")
    if not key:
        return restore_params(workdir, abstract_params, step)
    return restore_params(workdir, {key: abstract_params}, step)[key]


def model_config_of(init_from: str, **runtime: Any) -> ModelConfig:
    """The ModelConfig behind `init_from`: an HF directory's config.json or a workdir's saved config."""
    if is_hf_dir(init_from):
        return read_hf_config(init_from, **runtime)
    saved = read_config(init_from)
    try:
        return from_hf_dict(saved["hf_model_config"], where=f"{init_from} (saved config)", **runtime)
    except KeyError:
        raise ValueError(f"init_from={init_from}: its saved config has no 'hf_model_config'") from None


def initialize(
    workdir: str,
    checkpointer: Checkpointer | None,
    *,
    abstract_state: Any,
    init_from: str | None,
    fresh_state: Callable[[], Any],
    state_from_params: Callable[[Any], Any],
    abstract_params: Any,
    model_cfg: ModelConfig,
    sharder: Sharder,
) -> tuple[Any, dict, str]:
    """Applies the init precedence. Returns (state, data_state, how) with how in
    {'resumed', 'init_from_hf', 'init_from_workdir', 'scratch'}. Without a checkpointer (a benchmark,
    a test) there is nothing to resume."""
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, data_state, _ = checkpointer.restore(abstract_state)
        log.info("resumed from %s step %d", checkpointer.directory, checkpointer.latest_step())
        return state, data_state, "resumed"
    if init_from:
        if is_hf_dir(init_from):
            from align_jax.models.hf import load_pretrained

            _, params = load_pretrained(
                init_from, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype, sharder=sharder
            )
            how = "init_from_hf"
        elif os.path.isdir(checkpoint_dir(init_from)):
            params = restore_params(init_from, abstract_params)
            how = "init_from_workdir"
        else:
            raise FileNotFoundError(
                f"init_from={init_from}: neither a Hugging Face directory (no config.json) "
                f"nor a workdir with {CHECKPOINT_DIR}/"
            )
        log.info("params from %s (%s)", init_from, how)
        return state_from_params(params), {}, how
    return fresh_state(), {}, "scratch"


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
