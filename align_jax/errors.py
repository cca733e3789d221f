"""Errors whose message is the whole story for the user: what failed, where, and what to do. The launch
scripts print one of these as a single `error: ...` line and exit with USER_ERROR_EXIT_CODE (the
traceback comes back with --verbose); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import logging
import sys
import warnings

USER_ERROR_EXIT_CODE = 2
# A run stopped by SIGTERM after saving a checkpoint: not a failure, work to requeue. 75 is EX_TEMPFAIL
# ("temporary failure; the user is invited to retry") in sysexits.h; schedulers can requeue on it.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
    """Marks an error as one the launch layer reports in one line."""


class NotFoundError(UserError, FileNotFoundError):
    """A path the run reads holds nothing usable (a missing directory, or not what was expected)."""


class _OrbaxBackgroundErrors(logging.Filter):
    """Drops what Orbax and asyncio log, with tracebacks, when a background checkpoint write fails (one
    ERROR record per writer thread and per unretrieved task: ~450 lines for one full disk). The failure
    itself reaches the main thread as a CheckpointSaveError that names the path and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "/orbax/" in record.pathname:
            return False
        return not (record.name == "asyncio" and "orbax" in record.getMessage())


def quiet_background_save_errors() -> None:
    """Installs the filter above (the launch scripts do, unless --verbose), and drops the "Event loop is
    closed" errors TensorStore's completion callbacks raise into Orbax's already-closed loops after such a
    failure (printed as unraisable exceptions, one traceback per pending write)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_OrbaxBackgroundErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
    # The writes those callbacks never scheduled, reported once more at interpreter exit.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
