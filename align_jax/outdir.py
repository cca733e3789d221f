"""Writing a whole output directory (an HF export, a merged workdir) without ever losing what was there.

- The directory is written into a scratch directory beside it and renamed into place, so it appears all
  at once; a kill leaves only the scratch directory, whose name carries the writer's pid and host, so the
  next writer removes it (a full model's size) when that process is gone, and leaves a live one alone.
- A target is replaced only when it is absent, empty, or recognisably an earlier output of the same kind
  and the caller asked to overwrite it; never a workdir, a folder of runs or anyone's files.
- A target that is, contains or sits inside one of the inputs is refused: writing it would replace or
  bury what it is read from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def check_apart(out: str | os.PathLike, inputs: Iterable[tuple[str, str]], *, kind: str, suffix: str) -> None:
    """Raises ValueError if `out` is, is inside, or contains any input path (realpaths, so symlinks
    count); `inputs` are (role, path) pairs, e.g. ("workdir", W), named in the message."""
    o = os.path.realpath(out)
    for role, src in inputs:
        w = os.path.realpath(src)
        common = os.path.commonpath([o, w])
        how = "is" if o == w else "is inside" if common == w else "contains" if common == o else None
        if how:
            raise ValueError(
                f"{kind} target {out} {how} the {role} {src}; write the {kind} outside it, e.g. {w.rstrip(os.sep)}{suffix}"
            )


def check_replaceable(out: str | os.PathLike, *, kind: str, is_ours: Callable[[str], bool], overwrite: bool) -> None:
    """Raises FileExistsError unless `out` is absent, an empty directory, or (with `overwrite`) a previous
    `kind` as `is_ours(path)` recognises it. Everything else is never replaced, overwrite or not."""
    out = os.path.abspath(os.fspath(out))
    choose = f"Choose a new or empty directory for the {kind}."
    if os.path.islink(out):
        raise FileExistsError(f"{out} is a symlink to {os.path.realpath(out)}; {choose}")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise FileExistsError(f"{out} is a file, not a directory; {choose}")
    with os.scandir(out) as it:
        entries = sorted(it, key=lambda e: e.name)
    if not entries:
        return
    listing = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries[:6])
    listing += f" and {len(entries) - 6} more" if len(entries) > 6 else ""
    if not is_ours(out):
        raise FileExistsError(
            f"{out} holds {listing}: not a {kind}, so it is never replaced (overwrite replaces only a previous "
            f"{kind}). {choose}"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out} holds a previous {kind} ({listing}). Pass overwrite=True (--overwrite) to replace it, or "
            "choose a new or empty directory."
        )


def make_scratch(dst: str) -> str:
    """A new scratch directory beside `dst` (after removing dead writers' leftovers). Created with the
    umask's mode, not mkdtemp's 0700: it becomes `dst`."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    remove_leftovers(dst)
    path = _scratch_path(dst, "tmp")
    os.mkdir(path)
    return path


@contextlib.contextmanager
def staged(dst: str, check: Callable[[], None] | None = None) -> Iterator[str]:
    """Yields a scratch directory beside `dst` to write into; on success `check()` runs (the target may have
    changed while we wrote) and the scratch replaces `dst`; on any error the scratch is removed."""
    tmp = make_scratch(dst)
    try:
        yield tmp
        if check is not None:
            check()
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: str, dst: str) -> None:
    """Moves `src` to `dst`; an existing `dst` is swapped out first and removed only afterwards."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    if os.path.isdir(dst) and not os.listdir(dst):
        os.rename(src, dst)  # atomic over an empty directory; fails if something was written there meanwhile
        return
    old = _scratch_path(dst, "old")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _scratch_path(dst: str, kind: str) -> str:
    name = f".{os.path.basename(dst)}.{kind}-{os.getpid()}-{HOST}-{secrets.token_hex(4)}"
    return os.path.join(os.path.dirname(dst), name)


def remove_leftovers(dst: str) -> None:
    """Removes the scratch directories that writers of `dst` killed on this host left behind; one whose
    process still runs is a concurrent writer and is left alone, as is one from another host."""
    parent, base = os.path.split(dst)
    scratch = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-(\d+)-(.+)-[0-9a-f]{{8}}")
    for name in sorted(os.listdir(parent)):
        m = scratch.fullmatch(name)
        if not m:
            continue
        path, pid, host = os.path.join(parent, name), int(m[2]), m[3]
        if host != HOST:
            log.warning("%s (%s) is from a writer on host %s (pid %d); remove it if none runs there",
                        path, _size(path), host, pid)  # fmt: skip
        elif not _alive(pid):
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s (%s), left by an interrupted writer (pid %d is gone)", path, size, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(path: str) -> str:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):  # another host's writer may rename it away meanwhile
                total += os.lstat(os.path.join(root, f)).st_size
    return f"{total / 1e6:.1f} MB"
