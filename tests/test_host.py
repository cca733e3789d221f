"""align_jax/host.py: the allocator settings stop XLA's CPU executions from faulting their scratch memory
in again on every call."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from align_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function with a 128 MiB scratch buffer (the cumsum's [4096, 4096] float32 intermediate),
# called 24 times; prints the page faults of each of the last 16 calls and the malloc heap size.
_PROBE = textwrap.dedent(
    """
    import ctypes, json, resource
    from align_jax.host import tune_host_allocator
    applied = tune_host_allocator()
    import jax, jax.numpy as jnp
    x = jnp.full((4096, 4096), 1e-3, jnp.float32)
    f = jax.jit(lambda x: jnp.cumsum(jnp.exp(x) * 2.0, axis=0)[::7].sum(0))
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for i in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        if i >= 8:
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    print(json.dumps({"applied": applied, "temp_pages": temp // 4096, "faults": faults,
                      "heap_pages": libc.mallinfo2().arena // 4096}))
    """
)


def _probe(mode: str) -> dict:
    env = dict(os.environ, ALIGN_JAX_HOST_MALLOC=mode, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host._glibc() is None, reason="the settings are glibc mallopt parameters")
def test_tuned_allocator_stops_per_call_page_faults():
    tuned, default = _probe("tuned"), _probe("default")
    assert tuned["applied"] and not default["applied"]
    assert default["temp_pages"] >= 32768  # 128 MiB of scratch
    # glibc's defaults map the scratch buffer afresh each call and fault every page of it in...
    assert min(default["faults"]) > 0.9 * default["temp_pages"], default
    # ...the tuned heap keeps it for the next call. (Not every call: where the kernel reclaims idle
    # memory, e.g. DAMON pageout on this VM, a call now and then faults it back in.)
    assert tuned["heap_pages"] >= tuned["temp_pages"] > default["heap_pages"], (tuned, default)
    assert min(tuned["faults"]) < 0.01 * tuned["temp_pages"], tuned


def test_platform_detection_reads_jax_platforms(monkeypatch):
    assert host.jax_platform_is_cpu({"JAX_PLATFORMS": "cpu"})
    assert host.jax_platform_is_cpu({"JAX_PLATFORMS": "cpu,cuda"})
    assert not host.jax_platform_is_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not host.jax_platform_is_cpu({"JAX_PLATFORMS": "tpu"})
    # Unset: an installed accelerator plugin means JAX will not run on the CPU.
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert not host.jax_platform_is_cpu({})
    monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: None)
    assert host.jax_platform_is_cpu({})


def test_modes(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(host, "_glibc", lambda: FakeLibc())
    for env, applied in [
        ({"ALIGN_JAX_HOST_MALLOC": "default", "JAX_PLATFORMS": "cpu"}, False),
        ({"JAX_PLATFORMS": "cuda"}, False),  # auto: accelerators keep glibc's defaults
        ({"ALIGN_JAX_HOST_MALLOC": "tuned", "JAX_PLATFORMS": "cuda"}, True),
        ({"JAX_PLATFORMS": "cpu"}, True),
    ]:
        monkeypatch.setattr(host, "_applied", None)
        calls.clear()
        assert host.tune_host_allocator(env) is applied, env
        assert (calls == [(-8, 1), (-4, 0), (-1, -1)]) is applied
    assert host.tune_host_allocator({"ALIGN_JAX_HOST_MALLOC": "default"}) is True  # once per process
    monkeypatch.setattr(host, "_applied", None)
    with pytest.raises(ValueError, match="ALIGN_JAX_HOST_MALLOC='fast'"):
        host.tune_host_allocator({"ALIGN_JAX_HOST_MALLOC": "fast"})
