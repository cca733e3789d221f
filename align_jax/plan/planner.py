"""One plan: a stage config's train step compiled for a TPU topology, its per-chip memory against the chip's
HBM, and the search for the least remat and fewest microbatches that fit.

The step itself comes from a `build_step(config, devices)` the caller passes (align_jax/stages/plan.py:
the stage's real step over abstract state), so this module holds only what is the planner's own: the mesh,
the settings tried, the compiles, the numbers. Run it in a process of its own (launch/plan.py does):
JAX must stay on CPU and libtpu must be told it is not on a TPU VM (topology.compile_env).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import jax
import ml_collections

from align_jax.config import validate
from align_jax.config.sections import ConfigValueError, mesh_shape
from align_jax.models.attention import resolve_impl
from align_jax.plan import memory, search
from align_jax.plan.mesh import describe, fit_mesh, parse_mesh
from align_jax.plan.topology import Topology, compile_devices
from align_jax.sharding import MESH_AXES, normalize_rules

log = logging.getLogger(__name__)

BuildStep = Callable[[ml_collections.ConfigDict, list], Any]  # (config, devices) -> stages.plan.AbstractStep


@dataclasses.dataclass
class Request:
    config: ml_collections.ConfigDict
    preset: str  # the config's name, e.g. configs/sft.py:llama3_8b
    topology: Topology
    mesh: str = ""  # --mesh override, e.g. "fsdp=4,tensor=2"
    hbm_gib: float = 0.0  # 0: the chip's
    search: bool = True
    architecture: str = ""  # where the model's shape came from (stages.plan.model_config)


def _with(config: ml_collections.ConfigDict, microbatches: int, remat: search.Remat) -> ml_collections.ConfigDict:
    c = config.copy_and_resolve_references()
    c.unlock()
    c.train.microbatches = int(microbatches)
    c.model.remat_policy, c.model.layers_per_unit = remat.policy, int(remat.layers_per_unit)
    return c


def microbatch_options(config: ml_collections.ConfigDict, sizes: dict[str, int]) -> list[int]:
    """The microbatch counts the batch allows on this mesh: each microbatch splits evenly over the batch
    axes (build.make_sharder's check), and GRPO's PTX rows split too."""
    rules = dict(normalize_rules(None))
    rules.update(normalize_rules(config.mesh.rules))
    axes = rules.get("activation_batch") or ()
    ways = math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
    rows = int(config.data.batch_size)
    ptx = int(config.ptx_batch_size) if config.get("ptx_coef") else 0
    return [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % ways == 0 and (not ptx or ptx % m == 0)]


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """`jax.default_backend()` answers `platform` inside. align_jax picks its kernels by it (splash attention
    and ragged-dot experts on a TPU: models/attention.py, models/moe.py), and a planner's JAX runs on the CPU
    while it traces a step for TPU chips: the step compiled must be the one those chips would run."""
    with mock.patch.object(jax, "default_backend", lambda: platform):
        yield


class Planner:
    """Compiles settings of one request and keeps what each cost."""

    def __init__(self, request: Request, build_step: BuildStep):
        self.request, self.build_step = request, build_step
        topo = request.topology
        self.devices = compile_devices(topo)
        self.hbm = int(request.hbm_gib * memory.GIB) if request.hbm_gib else topo.hbm_bytes
        config = request.config.copy_and_resolve_references()
        config.unlock()
        if request.mesh:
            self.mesh, self.mesh_rule = parse_mesh(request.mesh, topo.chips), f"--mesh {request.mesh}"
        else:
            self.mesh, self.mesh_rule = fit_mesh(mesh_shape(config), topo.chips)
        config.mesh.update(**{ax: int(self.mesh[ax]) for ax in MESH_AXES})
        self.config = config
        self.step: Any = None  # the last step built (for the shape-side numbers)

    def measure(self, microbatches: int, remat: search.Remat) -> tuple[search.Candidate, dict]:
        """Compiles one setting: (the candidate, its details)."""
        config = _with(self.config, microbatches, remat)
        with compiling_for(self.devices[0].platform):
            try:
                validate(config)
                step = self.build_step(config, self.devices)
            except (ConfigValueError, ValueError) as e:
                return search.Candidate(microbatches, remat, None, False), {"invalid": str(e)}
            return self._compile(step, microbatches, remat)

    def _compile(self, step: Any, microbatches: int, remat: search.Remat) -> tuple[search.Candidate, dict]:
        self.step = step  # its shapes are known now, compiled or not
        state = self.state_bytes(step)
        if state > self.hbm:  # arguments hold at least the state: no need to compile to know
            reason = f"not compiled: the train state alone is {memory.gib(state):.2f} GiB per chip"
            return search.Candidate(microbatches, remat, None, False), {"skipped": reason}
        t0 = time.perf_counter()
        try:
            lowered = step.lower()
            t1 = time.perf_counter()
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: temporaries beyond the chip's HBM
            spent = {"lower_s": 0.0, "compile_s": round(time.perf_counter() - t0, 1)}
            return search.Candidate(microbatches, remat, None, False), {"error": str(e).splitlines()[0][:500], **spent}
        t2 = time.perf_counter()
        mem = memory.Memory.of(compiled)
        fits = memory.verdict(mem.peak, self.hbm) == memory.FITS
        log.info("%s m=%d: peak %.2f GiB (%.0f s)", remat, microbatches, memory.gib(mem.peak), t2 - t0)
        details = {"memory": mem.as_dict(), "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1)}
        return search.Candidate(microbatches, remat, mem.peak, fits), details

    @staticmethod
    def state_bytes(step: Any) -> int:
        """One chip's bytes of the train state (params, optimizer state, frozen reference or base)."""
        return memory.per_chip_bytes((step.state.params, step.state.opt_state, step.state.frozen))

    def run(self) -> dict:
        r, config = self.request, self.config
        details: dict[tuple[int, search.Remat], dict] = {}
        measured: dict[tuple[int, search.Remat], search.Candidate] = {}

        def measure(m: int, remat: search.Remat) -> search.Candidate:
            if (m, remat) not in measured:
                measured[(m, remat)], details[(m, remat)] = self.measure(m, remat)
            return measured[(m, remat)]

        own = search.Remat(str(config.model.remat_policy), int(config.model.layers_per_unit))
        preset = known = measure(int(config.train.microbatches), own)
        if self.step is None:  # the preset's own setting is invalid here: take the most microbatches that are
            options = microbatch_options(config, self.mesh)
            if options:
                known = measure(options[-1], own)
        out = self._header()
        out["preset_plan"] = self._row(preset, details)
        if self.step is not None:
            out.update(self._shapes())
        best = None
        if r.search and self.step is not None and self.state_bytes(self.step) <= self.hbm:
            best, _ = search.search(
                microbatch_options(config, self.mesh),
                search.ladder(self.step.model_cfg.num_layers),
                measure,
                known=known if known.peak is not None else None,
            )
        elif r.search:
            out["search_skipped"] = (
                "the train state alone is larger than the chip's HBM: no remat or microbatch count helps"
            )
        if r.search:
            out["best"] = self._row(best, details) if best is not None else None
        own_key = (preset.microbatches, preset.remat)
        out["searched"] = [self._row(c, details) for key, c in measured.items() if key != own_key]
        out["compiles"] = sum(1 for d in details.values() if "memory" in d or "error" in d)
        out["compile_s_total"] = round(sum(d.get("lower_s", 0) + d.get("compile_s", 0) for d in details.values()), 1)
        return out

    def _header(self) -> dict:
        r, topo = self.request, self.request.topology
        return {
            "config": r.preset,
            "stage": self.config.stage,
            "topology": topo.name,
            "chips": topo.chips,
            "device_kind": self.devices[0].device_kind,
            "hbm_gib": memory.gib(self.hbm),
            "mesh": {ax: s for ax, s in self.mesh.items() if s > 1} or {"data": 1},
            "mesh_text": describe(self.mesh),
            "mesh_rule": self.mesh_rule,
            "batch_rows": int(self.config.data.batch_size),
            "seq_len": int(self.config.data.seq_len),
            "architecture": r.architecture,
        }

    def _row(self, cand: search.Candidate, details: dict) -> dict:
        d = details.get((cand.microbatches, cand.remat), {})
        row = {"microbatches": cand.microbatches, "remat": str(cand.remat), **d}
        if cand.peak is not None:
            row["peak_gib"] = round(memory.gib(cand.peak), 2)
            row["verdict"] = memory.FITS if cand.fits else memory.DOES_NOT_FIT
        return row

    def _shapes(self) -> dict:
        """What shapes alone tell: the state's bytes per chip, FLOPs per step, and GRPO's KV cache."""
        step, config, topo = self.step, self.config, self.request.topology
        cfg = step.model_cfg
        state = {
            "params": memory.per_chip_bytes(step.state.params),
            "opt_state": memory.per_chip_bytes(step.state.opt_state),
            "frozen": memory.per_chip_bytes(step.state.frozen) if step.state.frozen is not None else 0,
        }
        state["total"] = self.state_bytes(step)
        rows, seq = int(config.data.batch_size), int(config.data.seq_len)
        # A full row as one sequence: each token attends to (T + 1) / 2 keys on average. Packed rows of
        # shorter sequences attend to fewer, so this is the upper end of the attention FLOPs.
        per_token = step.parts.flops_per_token((seq + 1) / 2)
        tokens = (rows + (int(config.ptx_batch_size) if config.get("ptx_coef") else 0)) * seq  # + GRPO's PTX rows
        per_step = per_token * tokens
        with compiling_for(self.devices[0].platform):
            attention = resolve_impl(cfg.attention_impl, cfg.jnp_dtype)
        out = {
            "n_params": cfg.num_params(),
            "attention": attention,
            "state_per_chip": state,
            "flops": {
                "per_token": per_token,
                "tokens_per_step": tokens,
                "per_step": per_step,
                # The step time at 100% MFU; divide by the MFU you expect (e.g. 0.4) for a step-time estimate.
                "ideal_step_s": per_step / (topo.peak_flops * topo.chips),
            },
        }
        if config.stage == "grpo":
            length = int(config.max_prompt_len) + int(config.max_new_tokens)
            slots = int(config.rollout_slots) or rows
            total, chip = memory.kv_cache_bytes(cfg, step.sharder, slots, length)
            out["rollout_kv_cache"] = {"rows": slots, "length": length, "total": total, "per_chip": chip}
        return out
