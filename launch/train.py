"""Runs one stage (or the pipeline) from a config file.

    python launch/train.py --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]

With several processes (TPU pod slices, multi-host GPU), `jax.distributed.initialize()` is called
first; it reads the coordinator from the environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS).

Exit codes: 0 done; 75 preempted (SIGTERM: a checkpoint was saved and `summary.json` says
`"preempted": true`; rerun the same command to resume, e.g. requeue on 75); 2 a problem in the inputs
or settings, printed as one `error: ...` line (`--verbose` shows the traceback); anything else a bug.
"""

from __future__ import annotations

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
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    import jax

    if _multiprocess():
        jax.distributed.initialize()
    from align_jax import stages
    from align_jax.errors import PREEMPTED_EXIT_CODE

    config = _CONFIG.value
    with cli.user_errors(verbose):
        summary = stages.get(config.stage).run(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(cli.summary_line(config.stage, summary, _WORKDIR.value))
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


if __name__ == "__main__":
    from align_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
