"""Host-process settings that make XLA's CPU backend fast: `tune_host_allocator()`.

XLA's CPU runtime takes each execution's scratch memory (every activation a train step keeps for its
backward pass: ~325 MB for the `tiny` SFT step) from `malloc` and frees it when the step ends. glibc
serves an allocation that large with a fresh `mmap` (always, from a worker thread's arena; from the main
arena above 32 MB) and unmaps it on `free`, so every step faults its whole scratch buffer in again, page by
page: 81,000 page faults and ~130 ms of kernel time per `tiny` step on a 2-core CPU, about half the step.

`tune_host_allocator()` keeps that memory in the process instead: one malloc arena for all threads
(worker-thread arenas cannot grow past 64 MB and fall back to mmap), no mmap for large blocks, and no
trimming of freed heap (any finite threshold below the scratch size just moves the faults to brk: with
2 GB, the 4 GB `small30m` step faulted 712k pages per step). The `tiny` step drops from ~235 ms to
~185 ms and `small30m` from 4.1 s to 3.6 s (docs/benchmarks.md). The cost: the process keeps its peak
heap until it exits, and the single arena fragments more: the `tiny` SFT demo (300 steps + evals)
peaks at 2.6 GB resident instead of 1.4 GB, and runs in 69 s instead of 84 s.

It must run before JAX starts its CPU backend (the first computation, `jax.devices()`, or
`jax.distributed.initialize()`): threads that have already allocated keep their own arenas. The
`launch/` scripts call it first thing. The test suite does not: it is compile-bound, and XLA's
multi-threaded compiler contends for the single arena (two test files: 92 s tuned vs 77 s default).
It applies only where the CPU is JAX's platform (GPU/TPU hosts keep glibc's defaults: their step memory
lives on the device), on glibc; set ALIGN_JAX_HOST_MALLOC=default to leave malloc alone, or =tuned to
apply it on any platform.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # mallopt takes an int; glibc reads -1 as SIZE_MAX for the trim threshold: never trim

_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
_applied: bool | None = None


def jax_platform_is_cpu(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or no accelerator plugin is
    installed. Decided without starting a backend (that would be too late for the allocator)."""
    env = os.environ if environ is None else environ
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def tune_host_allocator(environ: dict[str, str] | None = None) -> bool:
    """Applies the allocator settings above once per process; returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    env = os.environ if environ is None else environ
    mode = env.get("ALIGN_JAX_HOST_MALLOC", "auto")
    if mode not in ("auto", "tuned", "default"):
        raise ValueError(f"ALIGN_JAX_HOST_MALLOC={mode!r}: expected auto, tuned or default")
    _applied = False
    if mode == "default" or (mode == "auto" and not jax_platform_is_cpu(env)):
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
    )
    if not ok:
        log.warning("mallopt refused the host allocator settings; XLA CPU steps will page-fault their scratch memory")
    _applied = ok
    return ok


def _glibc():
    """libc when it is glibc (mallopt exists and gnu_get_libc_version answers), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc
