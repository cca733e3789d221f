"""What a run keeps in its workdir besides checkpoints: the exclusive lock, summary.json, and the
comparison of a stored config with a requested one.

The lock: a run holds `WORKDIR/.lock` (an exclusive `flock`) from start to exit, so a second run on the
same workdir fails at once with a message naming the holder, instead of both writing checkpoints and
metrics into one directory. The kernel releases a `flock` when its process dies, however it dies
(SIGKILL, OOM, a crash), so a lock can never outlive its run; the holder's description, written into
the file, is cleared on a clean exit, and one found when the lock is free says the previous run
crashed. The file itself is never deleted: deleting it would let a waiting run lock the old inode
while a third locks a new one. On several processes only process 0 takes the lock (they share the
workdir; the others' checkpoint writes are coordinated by Orbax).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from align_jax.errors import UserError

# What a stage workdir holds besides the lock and summary.json: the run's tokenizer (saved on first use,
# so a resume and the export use the same one) and Orbax's step directories.
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
SUMMARY = "summary.json"


_held: set[str] = set()  # workdirs this process holds


class WorkdirLocked(UserError, RuntimeError):
    """Another live run holds the workdir."""


def _holder_text() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
    )


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that left no description"


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool | None = None) -> Iterator[None]:
    """Holds the workdir's exclusive lock for the `with` block (creating the workdir). Raises
    WorkdirLocked, naming the holder, when another run holds it. `enabled=None`: process 0 locks, and on
    several processes every one of them raises with it (the others would otherwise wait in collectives)."""
    import jax

    multi = enabled is None and jax.process_count() > 1
    if enabled is None:
        enabled = jax.process_index() == 0
    key = os.path.realpath(workdir)
    if key in _held:  # re-entrant: the pas stage runs the sft stage in its own workdir
        yield
        return
    fd, refused = None, None
    if enabled:
        fd, refused = _acquire(workdir)
    if multi:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
            refused = WorkdirLocked(f"{os.path.abspath(workdir)} is in use by another run (process 0 says who)")
    if refused is not None:
        if fd is not None:
            os.close(fd)
        raise refused
    _held.add(key)  # on every process, so that nested calls broadcast (or not) alike
    try:
        yield
    finally:
        _held.discard(key)
        if fd is not None:
            os.ftruncate(fd, 0)  # a clean exit: the next run sees no stale holder
            os.close(fd)  # releases the flock


def _acquire(workdir: str) -> tuple[int | None, WorkdirLocked | None]:
    """(fd holding the flock, None), or (None, the refusal naming the holder)."""
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.close(fd)
        return None, WorkdirLocked(
            f"{os.path.abspath(workdir)} is in use by another run ({holder}); wait for it to finish, stop it, "
            "or use another --workdir"
        )
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
        log.warning(
            "%s: the previous run (%s) did not exit cleanly; its lock is free, taking over",
            workdir,
            _describe(previous),
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_text().encode(), 0)
    return fd, None


def write_summary(workdir: str, summary: dict) -> None:
    """WORKDIR/summary.json, written beside and renamed: the pipeline reads its presence as "this stage
    finished", so it must never exist half-written."""
    path = os.path.join(workdir, SUMMARY)
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2, default=_json_default)
    os.replace(path + ".tmp", path)


def read_summary(workdir: str) -> dict | None:
    path = os.path.join(workdir, SUMMARY)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _json_default(x):
    if isinstance(x, np.generic | np.ndarray) or hasattr(x, "__array__"):
        return np.asarray(x).tolist()
    return str(x)


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The leaves where two nested dicts differ, as "a.b: old -> new" lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def latest_step_on_disk(workdir: str) -> int | None:
    """A workdir's latest finished checkpoint step, read from the step directories' names (Orbax's
    in-progress saves have non-numeric names), without opening a checkpoint manager; None if none."""
    directory = checkpoint_dir(workdir)
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    return max(steps) if steps else None


def fingerprint(path: str) -> str | None:
    """What a stage's output is, for deciding whether what was built on it is stale: a hash of its
    summary.json (final step, final metrics, a merge's recipe and source steps) and its latest checkpoint
    step. An HF directory: its config.json's modification time and size. Absent: None."""
    if not path or not os.path.exists(path):
        return None
    h = hashlib.sha256()
    summary = os.path.join(path, SUMMARY)
    if os.path.isfile(summary):
        with open(summary, "rb") as f:
            h.update(f.read())
    h.update(str(latest_step_on_disk(path)).encode())
    config_json = os.path.join(path, "config.json")
    if os.path.isfile(config_json):
        st = os.stat(config_json)
        h.update(f"{st.st_mtime_ns}:{st.st_size}".encode())
    return h.hexdigest()[:16]


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
DEMO_DIR = os.path.join(_PACKAGE, "data", "demo")
EVAL_DATA_DIR = os.path.join(_PACKAGE, "eval", "data")
ENV_DATA_DIR = os.path.join(_PACKAGE, "envs", "data")  # the environments' demo prompts


def resolve_data_path(path: str) -> str:
    """`demo:NAME` names a bundled file: align_jax/data/demo/NAME.jsonl, else align_jax/eval/data/NAME.jsonl
    (the prompt sets with checks, e.g. demo:constraints_rl for GRPO), else align_jax/envs/data/NAME.jsonl
    (the environments' problems, e.g. demo:calculator); anything else is as given."""
    if path.startswith("demo:"):
        name = path[len("demo:") :] + ".jsonl"
        for directory in (DEMO_DIR, EVAL_DATA_DIR, ENV_DATA_DIR):
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
        return os.path.join(DEMO_DIR, name)
    return path
