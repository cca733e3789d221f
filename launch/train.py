"""Runs one stage (or the pipeline) from a config file.

    python launch/train.py --config configs/<stage>.py:<preset> --workdir DIR [--config.key=value ...]

Several processes (TPU pod slices, multi-host GPU, or several processes on one machine) run the same
command, one per host; `jax.distributed.initialize()` is called first. `--distributed` lets JAX find the
coordinator, the process count and this process's id by itself (TPU pod slice, SLURM, Open MPI,
Kubernetes; under `srun` with several tasks it is implied); elsewhere give them:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (README.md, "Multi-host training").

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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's coordinator, for several processes (else auto-detected)"
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes run this job (else auto-detected)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1 (else auto-detected)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "several processes, found by JAX itself (TPU pod slice, SLURM, Open MPI, Kubernetes)"
)
flags.mark_flags_as_required(["config", "workdir"])


def distributed_settings(environ: dict[str, str] | None = None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process. Flags win
    over JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; what neither gives is left to JAX's
    own detection (TPU metadata, SLURM, Open MPI, Kubernetes)."""
    env = os.environ if environ is None else environ
    settings = {
        "coordinator_address": _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": _NUM_PROCESSES.value
        if _NUM_PROCESSES.value is not None
        else _env_int(env, "JAX_NUM_PROCESSES"),
        "process_id": _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int(env, "JAX_PROCESS_ID"),
    }
    if settings["num_processes"] == 1:
        return None
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    detected = _DISTRIBUTED.value or int(env.get("SLURM_NTASKS", "1")) > 1 or len(hosts) > 1
    if not detected and all(v is None for v in settings.values()):
        return None
    return {k: v for k, v in settings.items() if v is not None}


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    return int(value) if value not in (None, "") else None


def main(argv):
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    import jax

    settings = distributed_settings()
    if settings is not None:
        cli.initialize_distributed(**settings)
        from align_jax.train.loop import catch_sigterm_early

        # A SIGTERM during startup must still stop every process together, after a step and a checkpoint.
        catch_sigterm_early()
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
