"""A plan as text for people: the human lines of launch/plan.py and the markdown table of `--table`."""

from __future__ import annotations

from typing import Any

from align_jax.plan.memory import gib


def _gib(n: float) -> str:
    # Small plans (the tests' tiny models) read in MiB; real ones in GiB.
    return f"{gib(n):.2f} GiB" if gib(n) >= 0.1 else f"{n / (1 << 20):.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _setting(row: dict) -> str:
    return f"{row['microbatches']} microbatch{'es' if row['microbatches'] > 1 else ''}, remat {row['remat']}"


def _result(row: dict, hbm_gib: float) -> str:
    if "invalid" in row:
        return f"{_setting(row)}: not valid on this mesh ({row['invalid']})"
    if "memory" not in row:
        return f"{_setting(row)}: {row.get('skipped') or row.get('error', 'not compiled')} -> DOES NOT FIT"
    m = row["memory"]
    return (
        f"{_setting(row)}: peak {_gib(m['peak'])} of {_gib(hbm_gib * (1 << 30))} -> {row['verdict']} "
        f"(arguments {_gib(m['argument'])}, temporaries {_gib(m['temp'])}, outputs {_gib(m['output'])}, "
        f"aliased {_gib(m['alias'])}; lowered in {row['lower_s']:.0f} s, compiled in {row['compile_s']:.0f} s)"
    )


def lines(plan: dict[str, Any]) -> list[str]:
    """The plan, one fact a line."""
    hbm = plan["hbm_gib"]
    out = [
        f"{plan['config']} on {plan['topology']}: {plan['chips']} chips ({plan['device_kind']}, {_gib(hbm * (1 << 30))} HBM "
        "each), "
        f"mesh {plan['mesh_text']} ({plan['mesh_rule']})",
    ]
    if "state_per_chip" in plan:
        s, f = plan["state_per_chip"], plan["flops"]
        out.append(
            f"  model {_count(plan['n_params'])} params ({plan['architecture']}), attention {plan['attention']}; per "
            "chip from shapes: params "
            f"{_gib(s['params'])}, optimizer {_gib(s['opt_state'])}, frozen {_gib(s['frozen'])}"
        )
        out.append(
            f"  step: {plan['batch_rows']} rows x {plan['seq_len']}: {f['tokens_per_step']} tokens, "
            f"{f['per_step']:.3g} FLOP ({f['per_token']:.3g} per token, align_jax/metrics.py); at 100% MFU "
            f"{f['ideal_step_s']:.2f} s/step, at 40% {f['ideal_step_s'] / 0.4:.2f} s"
        )
    out.append("  preset as configured: " + _result(plan["preset_plan"], hbm))
    for row in plan.get("searched", []):
        out.append("  tried " + _result(row, hbm))
    if plan.get("search_skipped"):
        out.append(f"  search skipped: {plan['search_skipped']}")
    best = plan.get("best")
    if best is not None:
        out.append(f"  best: {_setting(best)} (peak {_gib(best['memory']['peak'])}) -> FITS")
    elif "best" in plan:
        out.append("  best: nothing tried fits -> DOES NOT FIT on this topology with this mesh")
    if "rollout_kv_cache" in plan:
        kv = plan["rollout_kv_cache"]
        out.append(
            f"  rollout (not compiled here): the sampler's KV cache for {kv['rows']} rows x {kv['length']} slots is "
            f"{_gib(kv['total'])}, {_gib(kv['per_chip'])} per chip, beside the params"
        )
    out.append(f"  {plan['compiles']} compiles, {plan['compile_s_total']:.0f} s in all")
    return out


TABLE_HEADER = (
    "| stage | preset | topology | mesh | preset's setting (microbatches, remat): peak / HBM GiB | verdict "
    "| best fit (microbatches, remat) | best peak GiB (of HBM) | FLOP/step (s/step at 40% MFU) | compile s (preset) "
    "| compiles, total s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(stage: str, preset: str, topology: str, plan: dict | None, note: str = "") -> str:
    """One markdown row; `plan` None with `note` (e.g. the stage has no such preset)."""
    if plan is None:
        return f"| {stage} | {preset} | {topology} | – | {note} | – | – | – | – | – | – |"
    p, hbm = plan["preset_plan"], plan["hbm_gib"]
    if "peak_gib" in p:
        own, verdict = f"{p['microbatches']}, {p['remat']}: {p['peak_gib']:.1f} / {hbm:g}", p["verdict"]
    elif "skipped" in p:  # the state alone exceeds HBM
        state = plan["state_per_chip"]["total"] / (1 << 30)
        own, verdict = f"state alone {state:.0f} / {hbm:g}", "DOES NOT FIT"
    elif "error" in p:  # the compiler refused it (temporaries beyond the chip's HBM)
        own, verdict = f"{p['microbatches']}, {p['remat']}: compiler out of HBM", "DOES NOT FIT"
    else:
        own, verdict = f"{p['microbatches']}, {p['remat']}: not valid on this mesh", "–"
    best = plan.get("best")
    if best is not None:
        share = best["memory"]["peak"] / (hbm * (1 << 30))
        best_text, best_peak = f"{best['microbatches']}, {best['remat']}", f"{best['peak_gib']:.1f} ({share:.0%})"
    else:
        best_text, best_peak = ("none fits", "–") if "best" in plan else ("not searched", "–")
    f = plan.get("flops")
    flops = f"{f['per_step']:.2g} ({f['ideal_step_s'] / 0.4:.1f})" if f else "–"
    compile_s = f"{p['lower_s'] + p['compile_s']:.0f}" if "compile_s" in p else "–"
    return (
        f"| {stage} | {preset} | {topology} | {plan['mesh_text']} | {own} | {verdict} | {best_text} | {best_peak} "
        f"| {flops} | {compile_s} | {plan['compiles']}, {plan['compile_s_total']:.0f} |"
    )
