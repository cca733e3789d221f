"""Reading a stage workdir's checkpoints without writing anything: its saved config and its params as
stored. checkpoint.py (the manager, the init precedence) and lora/handoff.py (a LoRA workdir read as
plain params) both build on these; checkpoint.py re-exports them.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from align_jax.config.deprecated import upgrade_saved
from align_jax.errors import NotFoundError
from align_jax.workdir import CHECKPOINT_DIR, checkpoint_dir, latest_step_on_disk


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def open_reader(workdir: str, what: str) -> ocp.CheckpointManager:
    """A read-only manager over a workdir's checkpoints: reading never creates directories (a typo in
    init_from or --workdir used to leave `<typo>/checkpoints` behind) and fails naming what was expected."""
    directory = checkpoint_dir(workdir)
    if latest_step_on_disk(workdir) is None:
        if not os.path.isdir(workdir):
            found = "no such directory"
        elif not os.path.isdir(directory):
            found = f"a directory without {CHECKPOINT_DIR}/ (entries: {', '.join(sorted(os.listdir(workdir))[:8]) or 'none'})"
        else:
            found = f"{CHECKPOINT_DIR}/ holds no finished checkpoint step"
        raise NotFoundError(
            f"{what}={workdir}: expected an align_jax stage workdir (with {CHECKPOINT_DIR}/<step>/), found {found}"
        )
    # create=False and no save: nothing is written. (Orbax's read_only=True would say the same in a warning
    # on every open.)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))


def read_config(workdir: str, step: int | None = None, *, what: str = "workdir") -> dict:
    """The config saved with a workdir's checkpoint (latest by default)."""
    with open_reader(workdir, what) as mngr:
        step = mngr.latest_step() if step is None else step
        out = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return upgrade_saved(dict(out.config))


def restore_raw_params(workdir: str, abstract_params: Any, step: int | None = None, key: str = "params") -> Any:
    """The checkpoint's params tree as stored (a LoRA run's: its trainable tree), at the paths of
    `abstract_params`."""
    with open_reader(workdir, "init_from") as mngr:
        step = mngr.latest_step() if step is None else step
        target = {key: abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
        return mngr.restore(step, args=args).state[key]
