"""What every launch script does around its work: quiet logs by default, and the project's own errors as
one line with a documented exit code instead of a traceback.

    def main(argv) -> int:
        verbose = cli.setup(verbose_flag)       # before JAX, transformers or Orbax log anything
        with cli.user_errors(verbose):
            ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from align_jax.errors import USER_ERROR_EXIT_CODE, UserError, quiet_background_save_errors

# Loggers that report routine work at INFO: Orbax's every save/restore step (~40 lines a restore), JAX's
# search for backends it does not find ("Unable to initialize backend 'tpu'"), transformers' notices.
NOISY = ("absl", "jax._src.xla_bridge", "orbax", "transformers", "tensorflow")


class UserErrorExit(SystemExit):
    """Raised by `user_errors` after printing the message: exits with USER_ERROR_EXIT_CODE."""


def setup(verbose: bool = False) -> bool:
    """Logging for a launch script: INFO for align_jax's own progress, WARNING and up for the libraries;
    everything at INFO with `verbose`. Returns `verbose`."""
    if not verbose:
        # transformers prints "PyTorch was not found..." at import through its advisory channel.
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True
    )
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    with contextlib.suppress(ImportError):  # absl routes Python logging through its own handler: use ours
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)
    if not verbose:
        quiet_background_save_errors()
    return verbose


@contextlib.contextmanager
def user_errors(verbose: bool = False) -> Iterator[None]:
    """Turns a UserError into `error: <message>` on stderr and exit code 2; with `verbose`, the traceback."""
    try:
        yield
    except UserError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise UserErrorExit(USER_ERROR_EXIT_CODE) from None


def initialize_distributed(**settings: Any) -> None:
    """`jax.distributed.initialize(**settings)` for a multi-process run (launch/train.py), before anything
    touches a JAX backend. On CPU, cross-process collectives need an implementation: gloo (JAX's default
    since 0.5; older versions had none and every multi-process CPU computation failed)."""
    import jax

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    logging.getLogger(__name__).info(
        "process %d of %d (%d local devices of %d)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the errors users make (a misspelled `--config.` key, a bad value) as one
    line and exit code 2, instead of a 50-line traceback around an escaped "Did you mean" hint. For
    `app.run(main, flags_parser=cli.parse_flags)`."""
    from absl import flags

    from align_jax.config.deprecated import rewrite_flags

    new = rewrite_flags(argv)
    if new != argv and argv == sys.argv:  # ml_collections reads the --config.x overrides from sys.argv
        sys.argv = list(new)
    argv = new
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        inner: object = e
        while isinstance(inner, BaseException) and inner.args:  # AttributeError(KeyError("'k'\nDid you mean"))
            inner = inner.args[0]
        lines = [part.strip() for part in str(inner).splitlines() if part.strip()]
        if any(line.startswith("Traceback") for line in lines):
            # A config file's own error inside absl's wrapping: the flag, then the error's last line.
            lines = [str(e).splitlines()[0].split(":")[0] + ":", lines[-1]]
        text = " ".join(lines)
        bad = next((a for a in argv[1:] if a.startswith("--config.") and _names_key(a, text)), None)
        if bad and isinstance(e, AttributeError | KeyError):
            text = f"no such config key {text}"
        where = f"{bad.split('=')[0]}: " if bad else ""
        print(f"error: {where}{text}", file=sys.stderr)
        if "--verbose" in argv:
            raise
        raise UserErrorExit(USER_ERROR_EXIT_CODE) from None


def _names_key(arg: str, text: str) -> bool:
    keys = arg.split("=")[0].split(".")[1:]
    return any(f"'{key}'" in text or f'"{key}"' in text for key in keys)


def summary_line(stage: str, summary: dict, workdir: str) -> str:
    """The one human line a training command ends with (the numbers are in WORKDIR/summary.json)."""
    where = os.path.abspath(workdir)
    if stage == "pipeline":
        if summary.get("preempted"):
            return f"pipeline stopped: {summary['preempted']} was preempted (its checkpoint is saved); rerun to resume"
        if summary.get("report"):
            report = summary["report"]
            report = os.path.join(report, "report.md") if os.path.isdir(report) else report
            return f"pipeline done: report written to {report}"
        return f"pipeline done: stages {', '.join(summary.get('stages', []))} in {where}"
    step = summary.get("final_step")
    if summary.get("preempted"):
        return f"{stage} preempted at step {step}: checkpoint saved in {where}; rerun the same command to resume"
    counts = ("tokens", "pairs", "weight", "examples", "responses")  # the loss's denominators, not metrics
    shown = [
        f"{k[len('final_') :]} {v:.4g}"
        for k, v in summary.items()
        if k.startswith("final_eval_") and isinstance(v, float) and k.rsplit("_", 1)[-1] not in counts
    ]
    metrics = f" ({', '.join(shown[:3])})" if shown else ""
    return f"{stage} done at step {step}{metrics}: {where} (summary.json, checkpoints/)"
