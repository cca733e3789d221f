"""Fit planner: does a stage preset's train step fit a TPU slice, and with how many microbatches and what remat?

    python launch/plan.py --config configs/<stage>.py:<preset> --topology v5p-8[,v5p-128,...]
                          [--mesh fsdp=4,tensor=2] [--hbm_gib 16] [--nosearch] [--config.key=value ...]
    python launch/plan.py --table [--table_stages sft,dpo,grpo] [--table_presets llama3_8b,qwen2_7b,llama3_70b]
                          [--topology v5p-8,v5p-128,v5e-16]

Builds the stage's real train step (align_jax/stages/plan.py: the loss, state and step `runner.Run` builds)
over abstract state, never allocating a weight, and compiles it ahead of time for the slice's chips with
libtpu (`pip install -e '.[plan]'`) on this machine's CPU. Prints per-chip arguments / temporaries /
outputs / peak from the compiler's memory analysis against the chip's HBM (v4 32, v5e 16, v5p 95, v6e 32 GiB)
and a FITS / DOES NOT FIT verdict; then searches the remat ladder (none, save_dots, save_qkv_attn, full,
full with 2 and 4 layers per unit) and the microbatch counts (train.microbatches) for the least remat, then
the fewest microbatches, that fit (align_jax/plan/search.py says why in that order). FLOPs per step come
from align_jax/metrics.py's MFU accounting, not from `cost_analysis()` (which counts a scanned layer once).

Mesh: `--mesh`, else the preset's mesh when the slice's chip count can take it, else the preset's
tensor/sequence/expert axes (when they divide the chips) with fsdp over the rest (align_jax/plan/mesh.py).
The model's shape: config.init_from's config.json when set (no weights are read), else the preset's entry in
align_jax/plan/architectures.py, else config.model. GRPO plans the policy update; the rollout's KV cache is
given from shapes. Kernels are the slice's: align_jax picks splash attention and ragged-dot experts by
`jax.default_backend()`, which answers "tpu" while the planner traces (planner.compiling_for). GPU
topologies (gpu:h100x8) are refused: XLA compiles for a GPU only on a host with one.

Each plan runs in a process of its own (JAX on CPU, libtpu told it is not on a TPU VM). Prints the plan,
then (last line) one JSON object; `--table` prints a markdown table of every stage x preset x topology
(docs/benchmarks.md, "Fit planner"). Exit codes: 0 planned (whatever the verdict); 2 a problem in the inputs
(an unknown or GPU topology, libtpu missing, a bad --mesh).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from align_jax.errors import USER_ERROR_EXIT_CODE  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5p-8", "TPU slice(s), comma-separated: v5p-8, v5p-128, v5e-16, v6e-8, v4-8..."
)
_MESH = flags.DEFINE_string("mesh", "", "mesh override, e.g. fsdp=4,tensor=2 (default: the preset's, rescaled)")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB to judge against (default: the chip's)")
_SEARCH = flags.DEFINE_bool("search", True, "search microbatches and remat for the best setting that fits")
_TABLE = flags.DEFINE_bool("table", False, "plan every --table_stages x --table_presets x --topology; print markdown")
_TABLE_STAGES = flags.DEFINE_string("table_stages", "sft,dpo,grpo", "--table: stages (configs/<stage>.py)")
_TABLE_PRESETS = flags.DEFINE_string("table_presets", "llama3_8b,qwen2_7b,llama3_70b", "--table: preset names")
_VERBOSE = flags.DEFINE_bool("verbose", False, "log each compile; tracebacks for input errors")
_WORKER = flags.DEFINE_bool("worker", False, "internal: run one plan in this process (the parent sets its environment)")


def _config_spec(argv: list[str]) -> str:
    """The --config value as given (configs/sft.py:llama3_8b)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _preset(spec: str) -> str:
    return spec.rpartition(":")[2] if ":" in spec else ""


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the flags `names` (both --name=value and --name value forms)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0].lstrip("-")
        if name in names:
            skip = "=" not in arg and name == "topology"
            continue
        out.append(arg)
    return out


def worker() -> int:
    """One plan in this process: prints its lines, then its JSON."""
    from align_jax.plan import report
    from align_jax.plan.planner import Planner, Request
    from align_jax.plan.topology import topology
    from align_jax.stages import plan as stage_plan

    spec = _config_spec(sys.argv)
    preset = _preset(spec)
    config = _CONFIG.value
    _, architecture = stage_plan.model_config(config, preset)
    request = Request(
        config=config,
        preset=os.path.relpath(spec, ROOT) if os.path.isabs(spec) else spec,
        topology=topology(_TOPOLOGY.value),
        mesh=_MESH.value,
        hbm_gib=_HBM.value,
        search=_SEARCH.value,
        architecture=architecture,
    )
    try:
        planner = Planner(request, stage_plan.builder(preset))
    except ValueError as e:  # a --mesh the slice cannot take, a topology libtpu cannot make
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    plan = planner.run()
    print("\n".join(report.lines(plan)), flush=True)
    print(json.dumps(plan))
    return 0


def run_plan(argv: list[str], topo_name: str, capture: bool) -> tuple[int, dict | None, str]:
    """A worker process for one topology: (exit code, its JSON or None, its output when captured)."""
    from align_jax.plan.topology import compile_env, topology

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        *_without(argv, ("topology", "table", "notable", "worker", "noworker")),
    ]
    cmd += [f"--topology={topo_name}", "--worker"]
    out = subprocess.run(cmd, env=compile_env(topology(topo_name)), capture_output=capture, text=True)
    text = out.stdout if capture else ""
    plan = None
    if capture and out.returncode == 0 and text.strip():
        plan = json.loads(text.strip().splitlines()[-1])
    if capture and out.returncode:
        text += out.stderr
    return out.returncode, plan, text


def _check_topologies(names: list[str]) -> str | None:
    from align_jax.plan.topology import TopologyError, libtpu_available, topology

    for name in names:
        try:
            topology(name)
        except TopologyError as e:
            return str(e)
    if not libtpu_available():
        return "libtpu is not installed: pip install -e '.[plan]' (the TPU compiler the planner compiles with)"
    return None


def _has_preset(stage: str, preset: str) -> bool:
    """Whether configs/<stage>.py knows `preset` (its get_config raises ValueError naming its presets)."""
    path = os.path.join(ROOT, "configs", f"{stage}.py")
    spec = importlib.util.spec_from_file_location(f"plan_configs_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.get_config(preset)
    except ValueError:
        return False
    return True


def table(topologies: list[str]) -> int:
    """Every stage x preset x topology, each in its own worker; a markdown table at the end."""
    from align_jax.plan import report

    rows, plans = [], []
    for stage in filter(None, _TABLE_STAGES.value.split(",")):
        for preset in filter(None, _TABLE_PRESETS.value.split(",")):
            for topo in topologies:
                if not _has_preset(stage, preset):
                    rows.append(
                        report.table_row(stage, preset, topo, None, f"no `{preset}` preset in configs/{stage}.py")
                    )
                    continue
                argv = [f"--config=configs/{stage}.py:{preset}"]
                argv += [f"--hbm_gib={_HBM.value}"] if _HBM.value else []
                argv += [] if _SEARCH.value else ["--nosearch"]
                code, plan, text = run_plan(argv, topo, capture=True)
                lines = (
                    text.strip().splitlines()[:-1]
                    if code == 0
                    else [f"{stage}:{preset} on {topo}: failed", text[-3000:]]
                )
                print("\n".join(lines), flush=True)  # the plan's lines; its JSON joins the table's at the end
                if plan is None:
                    rows.append(report.table_row(stage, preset, topo, None, "planner failed (output above)"))
                    continue
                plans.append(plan)
                rows.append(report.table_row(stage, preset, topo, plan))
    print("\n" + report.TABLE_HEADER + "\n" + "\n".join(rows), flush=True)
    print(json.dumps({"plans": plans}))
    return 0


def main(argv) -> int:
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    del argv
    if _WORKER.value:
        with cli.user_errors(verbose):
            return worker()
    topologies = [t.strip() for t in _TOPOLOGY.value.split(",") if t.strip()]
    problem = _check_topologies(topologies)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    if _TABLE.value:
        return table(topologies)
    if _CONFIG.value is None:
        print("error: --config configs/<stage>.py:<preset> is required (or --table)", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    worst = 0
    for topo in topologies:
        code, _, _ = run_plan(sys.argv[1:], topo, capture=False)
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    app.run(main)
