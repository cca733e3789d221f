"""The hardware a plan is compiled for: TPU slices by their Cloud name, with each chip's HBM and peak FLOP/s.

A TPU slice is named by cores on v4 and v5p (two TensorCores per chip, fused as one "megacore" device:
v5p-8 is 4 chips) and by chips on v5e and v6e (one core per chip: v5e-16 is 16 chips). `compile_devices`
returns the devices of the slice without the hardware (`jax.experimental.topologies`, which needs libtpu):
XLA compiles for them ahead of time on any machine, and the compiled program's memory analysis is per chip.

GPUs: XLA's GPU compiler needs a CUDA client, and JAX creates one only on a host with a GPU (its mock
topologies, `jax_mock_gpu_topology`, mock the hosts around a real GPU, not the GPU itself). So a GPU plan
cannot be compiled on a CPU-only machine, and `gpu:` topologies are refused with that reason rather than
estimated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from align_jax.metrics import PEAK_FLOPS

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: what `get_topology_desc` takes to make its devices, and what each chip offers."""

    name: str  # the Cloud name, e.g. v5p-8
    chips: int
    topology_name: str  # libtpu's form, e.g. v5:2x2x1
    chip_config: str  # megacore (v4, v5p: one device per chip) or default
    wrap: tuple[bool, bool, bool]  # torus wrap-around links per dimension (full-size pods)
    hbm_gib: float  # per chip
    peak_flops: float  # per chip, dense bf16

    @property
    def hbm_bytes(self) -> int:
        return int(self.hbm_gib * GIB)


# Per generation: libtpu's name, chip config, HBM per chip (GiB), peak bf16 FLOP/s (metrics.PEAK_FLOPS).
_GENERATIONS = {
    "v4": ("v4", "megacore", 32.0, PEAK_FLOPS["TPU v4"]),
    "v5p": ("v5", "megacore", 95.0, PEAK_FLOPS["TPU v5p"]),
    "v5e": ("v5e", "default", 16.0, PEAK_FLOPS["TPU v5e"]),
    "v6e": ("v6e", "default", 32.0, PEAK_FLOPS["TPU v6e"]),
}
# Cloud name -> chip grid. v4 / v5p name cores (2 per chip), v5e / v6e chips. Wrap-around links exist from a
# full 4x4x4 cube up (v4 / v5p); the v5e / v6e slices here are smaller than a full 16x16 pod, so none wrap.
_SLICES = {
    "v4-8": "2x2x1",
    "v4-16": "2x2x2",
    "v4-32": "2x2x4",
    "v4-64": "2x4x4",
    "v4-128": "4x4x4",
    "v5p-8": "2x2x1",
    "v5p-16": "2x2x2",
    "v5p-32": "2x2x4",
    "v5p-64": "2x4x4",
    "v5p-128": "4x4x4",
    "v5p-256": "4x4x8",
    "v5e-1": "1x1",
    "v5e-4": "2x2",
    "v5e-8": "2x4",
    "v5e-16": "4x4",
    "v5e-32": "4x8",
    "v5e-64": "8x8",
    "v6e-1": "1x1",
    "v6e-4": "2x2",
    "v6e-8": "2x4",
    "v6e-16": "4x4",
    "v6e-32": "4x8",
    "v6e-64": "8x8",
}


def _topology(name: str, grid: str) -> Topology:
    generation = name.split("-")[0]
    libtpu_name, chip_config, hbm_gib, peak = _GENERATIONS[generation]
    dims = [int(d) for d in grid.split("x")]
    chips = 1
    for d in dims:
        chips *= d
    wrap = (len(dims) == 3 and min(dims) >= 4,) * 3
    return Topology(name, chips, f"{libtpu_name}:{grid}", chip_config, wrap, hbm_gib, peak)


TOPOLOGIES = {name: _topology(name, grid) for name, grid in _SLICES.items()}

# GPU names the planner knows, each refused on a machine without a GPU (module docstring).
GPUS = {"gpu:h100x8": (8, 80.0, PEAK_FLOPS["H100"]), "gpu:h200x8": (8, 141.0, PEAK_FLOPS["H200"])}
GPU_REFUSAL = (
    "{name}: ahead-of-time compilation for GPUs needs a CUDA client, which JAX creates only on a host with a "
    "GPU and the cuda extra (pip install -e '.[cuda]'); this planner compiles for TPU topologies only, and does "
    "not estimate what it cannot compile. On a GPU host, launch/bench.py measures a preset's step and its "
    "compiled peak memory on the GPUs it has."
)


class TopologyError(ValueError):
    """A topology the planner cannot compile for, with the reason."""


def topology(name: str) -> Topology:
    """The TPU slice called `name` (v5p-8, v5e-16, ...); GPU names and unknown names raise TopologyError."""
    if name in GPUS:
        raise TopologyError(GPU_REFUSAL.format(name=name))
    if name not in TOPOLOGIES:
        raise TopologyError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)} (and {', '.join(GPUS)})")
    return TOPOLOGIES[name]


def libtpu_available() -> bool:
    """Whether libtpu is installed (`pip install -e '.[plan]'`): it holds the TPU compiler."""
    return importlib.util.find_spec("libtpu") is not None


def compile_env(topo: Topology, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a planner process. JAX stays on CPU (so a planner run on a TPU VM does not take
    its TPUs from a training job), and libtpu is told which slice it is on and that it need not ask a
    metadata server, which it would otherwise try, and then warn about, on a machine that is not a TPU VM."""
    env = dict(os.environ if environ is None else environ)
    env.update(
        JAX_PLATFORMS="cpu",
        TPU_SKIP_MDS_QUERY="1",
        TPU_ACCELERATOR_TYPE=topo.name,
        TPU_WORKER_HOSTNAMES="localhost",
        ALLOW_MULTIPLE_LIBTPU_LOAD="1",
    )
    return env


def compile_devices(topo: Topology) -> list:
    """The slice's devices, for compiling only: one per chip, in the order `jax.make_mesh` expects."""
    from jax.experimental import topologies

    if not libtpu_available():
        raise TopologyError("libtpu is not installed: pip install -e '.[plan]' (it brings the TPU compiler)")
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology_name,
        chip_config_name=topo.chip_config,
        chips_per_host_bounds=(2, 2, 1) if topo.chips >= 4 else (1, 1, 1),
        num_slices=1,
        wrap=topo.wrap,
    )
    devices = list(desc.devices)
    if len(devices) != topo.chips:  # the naming rule above is ours: the compiler has the last word
        raise TopologyError(f"{topo.name}: libtpu made {len(devices)} devices, expected {topo.chips} chips")
    return devices
