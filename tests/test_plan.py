"""The fit planner (launch/plan.py, align_jax/plan/, align_jax/stages/plan.py): its search and mesh rules,
the step it compiles being the one training runs, and a real ahead-of-time compile for a TPU slice."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from align_jax.plan import search
from align_jax.plan.mesh import fit_mesh, parse_mesh
from align_jax.plan.search import Candidate, Remat
from align_jax.plan.topology import GPUS, TOPOLOGIES, TopologyError, libtpu_available, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "launch", "plan.py")
needs_libtpu = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu is not installed (pip install -e '.[plan]'): no TPU compiler to plan with"
)
# configs/sft.py:tiny cut to 2 layers, rolled (scan_unroll 1), 8 rows of 128: a few seconds per TPU compile on
# a CPU, and over data=4 only 1 or 2 microbatches, so a search compiles little.
SMALL = [
    "--config.model.num_layers=2",
    "--config.model.scan_unroll=1",
    "--config.data.seq_len=128",
    "--config.data.batch_size=8",
]


def load_config(stage: str, preset: str):
    spec = importlib.util.spec_from_file_location(f"plan_test_{stage}", os.path.join(ROOT, "configs", f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.unlock()
    return config


# -- the rules, without a compiler -----------------------------------------------------------------------


def test_search_takes_the_least_remat_then_the_fewest_microbatches():
    rungs = search.ladder(4)
    # Memory falls with microbatches and down the ladder; it fits below 10.
    cost = {r: 16 - 3 * i for i, r in enumerate(rungs)}
    compiled = []

    def measure(m: int, remat: Remat) -> Candidate:
        compiled.append((m, str(remat)))
        peak = cost[remat] - m
        return Candidate(m, remat, peak, peak < 10)

    # none fits at 8 microbatches (16 - 8), not at 4 (12): no remat, 8 microbatches.
    best, tried = search.search([1, 2, 4, 8], rungs, measure)
    assert (best.microbatches, str(best.remat)) == (8, "none")
    assert [(c.microbatches, str(c.remat)) for c in tried] == compiled and len(compiled) <= 6

    # The preset fits at full remat: no rung above it is compiled, and a cheaper one is found.
    compiled.clear()
    best, _ = search.search([1, 2, 4, 8], rungs, measure, known=Candidate(4, Remat("full"), 9, True))
    assert str(best.remat) == "none" and not any("k=" in r for _, r in compiled)

    # The preset does not fit at the most microbatches: no rung below it is compiled.
    def only_k4(m: int, remat: Remat) -> Candidate:
        compiled.append((m, str(remat)))
        return Candidate(m, remat, 1, remat.layers_per_unit == 4 and m >= 2)

    compiled.clear()
    best, _ = search.search([1, 2, 4, 8], rungs, only_k4, known=Candidate(8, Remat("full"), 99, False))
    assert (best.microbatches, str(best.remat)) == (2, "full/k=4")
    assert all(r.startswith("full/k=") for _, r in compiled)

    # Nothing fits: None.
    assert search.search([1, 2], rungs, lambda m, r: Candidate(m, r, 99, False))[0] is None
    assert search.ladder(6) == [r for r in search.LADDER if r.layers_per_unit != 4]  # k must divide the layers


def test_mesh_rescale_keeps_a_mesh_that_fits_and_puts_the_rest_on_fsdp():
    assert fit_mesh({"data": 1, "fsdp": -1}, 4) == (
        {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1, "expert": 1},
        "the preset's mesh",
    )
    # llama3_70b's fsdp=16 x tensor=4 (x data for the rest) on 16 chips: tensor kept, fsdp takes the rest.
    sizes, note = fit_mesh({"data": -1, "fsdp": 16, "tensor": 4}, 16)
    assert sizes == {"data": 1, "fsdp": 4, "tensor": 4, "sequence": 1, "expert": 1} and "rescaled" in note
    assert fit_mesh({"data": -1, "fsdp": 16, "tensor": 4}, 128)[0]["data"] == 2  # the preset's, as is
    assert fit_mesh({"fsdp": 2, "tensor": 3}, 8)[0] == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1, "expert": 1}
    assert parse_mesh("fsdp=-1,tensor=2", 8)["fsdp"] == 4
    with pytest.raises(ValueError, match="does not cover"):
        parse_mesh("fsdp=3", 8)


def test_topology_names_and_gpu_refusal():
    assert {n: TOPOLOGIES[n].chips for n in ("v5p-8", "v5p-128", "v4-8", "v5e-16", "v6e-8")} == {
        "v5p-8": 4,  # v4 / v5p name cores: two per chip
        "v5p-128": 64,
        "v4-8": 4,
        "v5e-16": 16,  # v5e / v6e name chips
        "v6e-8": 8,
    }
    assert (topology("v5e-16").hbm_gib, topology("v5p-8").hbm_gib) == (16.0, 95.0)
    for name in GPUS:
        with pytest.raises(TopologyError, match="needs a CUDA client"):
            topology(name)


# -- the step is the one training runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
    """A workdir holding the demo tokenizer (trained once by an SFT Run), reused by the other stages' Runs."""
    return str(tmp_path_factory.mktemp("plan_tokenizer"))


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_planned_step_is_the_training_step(stage, tokenizer_workdir):
    """The step stages/plan.py builds from shapes lowers to the same program as runner.Run's step."""
    from align_jax import stages
    from align_jax.stages import plan as stage_plan
    from align_jax.stages import runner

    if stage != "sft" and not os.path.isdir(os.path.join(tokenizer_workdir, "tokenizer")):
        test_planned_step_is_the_training_step("sft", tokenizer_workdir)  # run alone: make the tokenizer first
    config = load_config(stage, "tiny")
    config.model.update(num_layers=2, scan_unroll=1)
    config.data.seq_len = 128 if stage != "grpo" else 96
    config.tokenizer = "demo"
    # Settings away from their defaults, so a loss built without them differs from the stage's.
    config.train.update(loss_chunk=32, z_loss=1e-4 if stage == "sft" else 0.0, microbatches=2)
    run = runner.Run(stages.get(stage).spec, config, tokenizer_workdir)
    planned = stage_plan.abstract_step(config, run.sharder, run.model_cfg)
    assert (planned.state.frozen is not None) == (stage != "sft")  # DPO's in-step and GRPO's reference
    ours = planned.lower().as_text()
    assert ours == run.step_fn.lower(planned.state, planned.batch).as_text()


# -- a real compile for a TPU slice ---------------------------------------------------------------------


def plan(*args: str) -> dict:
    cmd = [sys.executable, PLAN, "--config", os.path.join(ROOT, "configs", "sft.py") + ":tiny", *SMALL, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_libtpu
def test_plan_compiles_for_a_tpu_slice_and_searches_when_it_does_not_fit():
    first = plan("--topology", "v5p-8", "--nosearch")
    assert (first["chips"], first["device_kind"], first["mesh"]) == (4, "TPU v5", {"data": 4})
    own = first["preset_plan"]
    mem, state = own["memory"], first["state_per_chip"]
    # The arguments hold at least the state (params + Adam moments, replicated over data=4) plus the batch.
    params = first["n_params"] * 4
    assert state["params"] == params and state["opt_state"] >= 2 * params
    assert mem["argument"] >= state["params"] + state["opt_state"]
    assert mem["temp"] > 0 and mem["peak"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    assert own["verdict"] == "FITS" and own["compile_s"] > 0
    assert first["flops"]["per_step"] == pytest.approx(first["flops"]["per_token"] * 8 * 128)

    # HBM just below the preset's peak: the preset does not fit, and the search finds the fewest microbatches
    # (or the least remat) that does.
    hbm = (mem["peak"] - 0.2 * mem["temp"]) / (1 << 30)
    second = plan("--topology", "v5p-8", f"--hbm_gib={hbm}")
    assert second["preset_plan"]["verdict"] == "DOES NOT FIT"
    best = second["best"]
    assert best["verdict"] == "FITS" and best["memory"]["peak"] <= hbm * (1 << 30)
    assert best["microbatches"] > 1 or best["remat"] != "none"
    assert math.isclose(second["hbm_gib"], hbm, rel_tol=1e-3)


def test_plan_refuses_gpu_topologies_with_the_reason():
    out = subprocess.run(
        [sys.executable, PLAN, "--config", os.path.join(ROOT, "configs", "sft.py") + ":tiny", "--topology=gpu:h100x8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "needs a CUDA client" in out.stderr
