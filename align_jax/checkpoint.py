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

import contextlib
import glob
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

# The readers live apart (lora/handoff.py builds on them too); they stay importable from here.
from align_jax.checkpoint_reader import is_hf_dir as is_hf_dir
from align_jax.checkpoint_reader import open_reader as open_reader
from align_jax.checkpoint_reader import read_config as read_config
from align_jax.checkpoint_reader import restore_raw_params as restore_raw_params
from align_jax.config.deprecated import upgrade_saved
from align_jax.errors import NotFoundError, UserError
from align_jax.lora import handoff
from align_jax.models.config import ModelConfig
from align_jax.models.hf_config import from_hf_dict, read_hf_config
from align_jax.sharding import Sharder
from align_jax.workdir import CHECKPOINT_DIR, checkpoint_dir, config_diff, latest_step_on_disk, read_summary

log = logging.getLogger(__name__)


class CheckpointSaveError(UserError, RuntimeError):
    """Writing a checkpoint failed (disk full, quota, permissions). The message names the directory, the
    OS's reason and the last complete checkpoint; Orbax's own error is kept in `original`."""

    def __init__(self, message: str, original: BaseException):
        super().__init__(message)
        self.original = original


class ResumeMismatchError(UserError, ValueError):
    """A workdir's checkpoint was written with settings its state cannot be restored under."""


def _os_reason(error: BaseException) -> str:
    """The operating system's words for a failed write, dug out of Orbax's and TensorStore's wrapping
    (an OSError somewhere in the chain, or TensorStore's "...: REASON [os_error_code='N']")."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror} (errno {e.errno})"
        m = re.search(r":\s*([^:\[\]]+?)\s*\[os_error_code='(\d+)'\]", str(e))
        if m:
            return f"{m.group(1)} (errno {m.group(2)})"
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


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
        if keep < 0:
            raise ValueError(f"keep={keep}: the number of latest checkpoints to keep, >= 1 (0: keep all)")
        policies = ocp.checkpoint_managers
        # The latest checkpoint is always among the kept ones: LatestN(n=0) would delete even the final one.
        keep_policy = policies.LatestN(n=keep or None)
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
            # A save cut off by a kill leaves a model-sized `<step>.orbax-checkpoint-tmp*`; the workdir lock
            # guarantees no other run is writing one, so they are safe to remove at start.
            cleanup_tmp_directories=True,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step whose (async) save may still be in flight
        self._failed = False  # a save failed (and was reported)

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
        # An async save's failure surfaces at the next save: name that step, not this one.
        with self._save_errors(self._saving if self._saving is not None else step):
            self.manager.save(step, args=args, metrics=metrics, force=True)
        self._saving = step

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

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with a step of this workdir (latest by default), without reading the state."""
        step = self.manager.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return upgrade_saved(dict(out.config or {}))

    def wait(self) -> None:
        with self._save_errors(self._saving):
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        try:
            if self._failed:  # already reported; what is left is the same failure's other threads
                with contextlib.suppress(Exception):
                    self.manager.wait_until_finished()
            else:
                self.wait()
        finally:
            self.manager.close()
            if self._failed:
                self._remove_partial_steps()  # writer threads that outlived the error may have recreated them

    def _remove_partial_steps(self) -> None:
        for partial in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(partial, ignore_errors=True)  # frees the space the failed save took

    @contextlib.contextmanager
    def _save_errors(self, step: int | None):
        """Turns a failed write (Orbax's ~100-line chain around one OS error) into one message naming the
        directory, the reason and the last complete checkpoint, and removes the partial step."""
        try:
            yield
        except Exception as e:
            self._saving, self._failed = None, True
            with contextlib.suppress(Exception):  # let the save's other writer threads finish first
                self.manager.wait_until_finished()
            self._remove_partial_steps()
            last = latest_step_on_disk(os.path.dirname(self.directory))
            where = f"{self.directory}/{last}" if last is not None else "none (nothing was saved yet)"
            log.debug("checkpoint save failed", exc_info=e)
            raise CheckpointSaveError(
                f"saving checkpoint step {step if step is not None else '?'} under {self.directory} failed: "
                f"{_os_reason(e)}. Last complete checkpoint: {where}; fix the cause (e.g. free disk space) and "
                "rerun the same command to resume from it",
                original=e,
            ) from None


def restore_params(
    workdir: str, abstract_params: Any, step: int | None = None, key: str = "params", *, sharder: Sharder | None = None
) -> Any:
    """Params only, from a stage workdir's checkpoint, into the shardings of `abstract_params`.

    The optimizer state and everything else in the checkpoint are not read. A LoRA run's checkpoint holds
    its adapters only: its params are then its base (re-read from its own init_from, placed by `sharder`
    when that is an HF directory) with the adapters merged in (align_jax/lora/handoff.py)."""
    return handoff.restore_params(workdir, abstract_params, step, key, sharder=sharder)


def decoder_key(saved: dict) -> str | None:
    """Where a workdir's causal-LM params sit inside its params tree: at the top (SFT, DPO, GRPO, merge),
    under 'policy' (PPO keeps policy and value side by side), or nowhere (a reward model)."""
    config = saved.get("config", {})
    if config.get("stage") == "rm":
        return None
    if config.get("stage") == "grpo" and config.get("algorithm") == "ppo":
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


_warned_unfinished: set[str] = set()


def init_from_kind(init_from: str) -> str:
    """'hf' or 'workdir' for what `init_from` names; any other path is an error that says what was
    expected there. A workdir whose stage did not finish (preempted, crashed, still running) is used,
    with a warning: its latest checkpoint is a half-trained model."""
    if is_hf_dir(init_from):
        return "hf"
    if latest_step_on_disk(init_from) is not None:
        summary = read_summary(init_from)
        if (summary is None or summary.get("preempted")) and init_from not in _warned_unfinished:
            _warned_unfinished.add(init_from)
            state = "was preempted" if summary else "has no summary.json (unfinished, or still running)"
            log.warning(
                "init_from=%s %s: starting from its latest checkpoint, step %d, which is not the stage's final model",
                init_from,
                state,
                latest_step_on_disk(init_from),
            )
        return "workdir"
    if not os.path.isdir(init_from):
        found = "no such directory"
    else:
        entries = sorted(os.listdir(init_from))
        found = f"a directory holding {', '.join(entries[:8]) + (', ...' if len(entries) > 8 else '') or 'nothing'}"
    raise NotFoundError(
        f"init_from={init_from} is neither a Hugging Face directory (config.json + safetensors weights) nor an "
        f"align_jax stage workdir ({CHECKPOINT_DIR}/<step>/ with a finished step): found {found}"
    )


def model_config_of(init_from: str, **runtime: Any) -> ModelConfig:
    """The ModelConfig behind `init_from`: an HF directory's config.json or a workdir's saved config."""
    if init_from_kind(init_from) == "hf":
        return read_hf_config(init_from, **runtime)
    saved = read_config(init_from, what="init_from")
    try:
        return from_hf_dict(saved["hf_model_config"], where=f"{init_from} (saved config)", **runtime)
    except KeyError:
        raise ValueError(f"init_from={init_from}: its saved config has no 'hf_model_config'") from None


# What a checkpoint's state is shaped by: resuming under other values cannot restore it. Everything else
# in the saved config may change on resume (train.steps grows; a learning rate is changed on purpose),
# and a change is logged.
_STATE_SHAPING = ("hf_model_config", "runtime.param_dtype", "config.stage", "config.algorithm", "lora")
# How a run reports, not what it trains: changes are not worth a warning.
_REPORTING = ("train.steps", "train.progress", "train.log_every", "train.eval_every", "train.ckpt_every")


def _pick(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resume(checkpointer: Checkpointer, expected: dict) -> None:
    """Compares the config saved with the latest checkpoint against this run's (`expected`, the dict a
    checkpoint stores: config, hf_model_config, runtime) before anything is restored. A difference in what
    shapes the state is an error naming each key (instead of Orbax's page of shape mismatches); other
    differences are logged."""
    saved = checkpointer.read_config()
    shaping = []
    for key in _STATE_SHAPING:
        shaping += config_diff(_pick(saved, key), _pick(expected, key), f"{key.replace('hf_model_config', 'model')}.")
    if shaping:
        raise ResumeMismatchError(
            f"{os.path.dirname(checkpointer.directory)} holds checkpoints of a run with other settings, which this "
            f"run's state cannot be restored from: {'; '.join(shaping)}. Rerun with the original settings to "
            "resume, or use another --workdir (or delete its checkpoints/) to start over"
        )
    saved_cfg, cfg = dict(saved.get("config") or {}), dict(expected.get("config") or {})
    for section in ("train", "metrics"):
        saved_cfg[section], cfg[section] = dict(saved_cfg.get(section) or {}), dict(cfg.get(section) or {})
    for key in _REPORTING:
        section, name = key.split(".")
        saved_cfg[section].pop(name, None)
        cfg[section].pop(name, None)
    saved_cfg.pop("metrics"), cfg.pop("metrics")
    changed = config_diff(saved_cfg, cfg)
    if changed:
        log.warning("resuming with settings that differ from the saved run: %s", "; ".join(changed))


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
        step = checkpointer.latest_step()
        try:
            state, data_state, _ = checkpointer.restore(abstract_state)
        except (ValueError, KeyError, TypeError) as e:
            # Shapes and structure are checked first (check_resume); this is what that cannot see.
            first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
            raise ResumeMismatchError(
                f"cannot resume from {checkpointer.directory}/{step}: its state does not match this run's "
                f"({first}). Rerun with the settings it was written with, or use another --workdir"
            ) from None
        log.info("resumed from %s step %d", checkpointer.directory, step)
        return state, data_state, "resumed"
    if init_from:
        if init_from_kind(init_from) == "hf":
            from align_jax.models.hf import load_pretrained

            _, params = load_pretrained(
                init_from, dtype=model_cfg.param_dtype, compute_dtype=model_cfg.dtype, sharder=sharder
            )
            how = "init_from_hf"
        else:
            params = restore_params(init_from, abstract_params, sharder=sharder)
            how = "init_from_workdir"
        log.info("params from %s (%s)", init_from, how)
        return state_from_params(params), {}, how
    return fresh_state(), {}, "scratch"


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
