"""Runs one stage (or the pipeline) from a config file.

    python launch/train.py --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]

With several processes (TPU pod slices, multi-host GPU), `jax.distributed.initialize()` is called
first; it reads the coordinator from the environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS).

Exit codes: 0 done; 75 preempted (SIGTERM: a checkpoint was saved and `summary.json` says
`"preempted": true`; rerun the same command to resume, e.g. requeue on 75); 2 a problem in the inputs
or settings, printed as one `error: ...` line (`--verbose` shows the traceback); anything else a bug.
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

from align_jax.host import tune_host_allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and outputs go")
_VERBOSE = flags.DEFINE_bool("verbose", False, "tracebacks for input and settings errors too")
flags.mark_flags_as_required(["config", "workdir"])


def _multiprocess() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def main(argv):
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax logs every save step at INFO through absl; keep its warnings, drop the chatter.
    logging.getLogger("absl").setLevel(logging.WARNING)
    import jax

    if _multiprocess():
        jax.distributed.initialize()
    from align_jax import stages
    from align_jax.errors import PREEMPTED_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError, quiet_background_save_errors

    if not _VERBOSE.value:
        quiet_background_save_errors()
    config = _CONFIG.value
    try:
        summary = stages.get(config.stage).run(config, _WORKDIR.value)
    except UserError as e:
        if _VERBOSE.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    if jax.process_index() == 0:
        print(json.dumps({"stage": config.stage, **summary}, default=str))
    if summary.get("preempted"):
        logging.warning("preempted: checkpoint saved; exiting with %d (rerun to resume)", PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    app.run(main)
