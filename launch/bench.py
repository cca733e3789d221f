"""Steady-state training throughput of a stage preset, after compilation.

    python launch/bench.py --config configs/{sft,rm,dpo}.py:<preset> [--steps 10] [--compare_torch]
                           [--remat_table] [--compare_reference] [--config.key=value ...]
    python launch/bench.py --generate --config configs/sft.py:<preset> [--gen_batch 8] [--gen_prompt 64]
                           [--gen_new 128] [--compare_torch]

Prints a human line, then (last line) one JSON object with tokens_per_s, mfu, packing_efficiency,
compile_s, step_s, peak_bytes, n_compiles and the model's shape.

Accounting: tokens_per_s counts real (non-pad) tokens; slots_per_s counts every token slot of the
batch. MFU = training FLOPs of the real tokens / (peak FLOP/s x devices), with training FLOPs per token
= 6 x (matmul params, LM head included, embedding lookup excluded) + causal attention over each
token's own segment (align_jax/metrics.py). On CPU there is no meaningful peak: mfu is 0 unless
--config.train.peak_flops is given.

--compare_torch runs the same model shape and batch through transformers + torch AdamW
(forward, backward, optimizer step) in the same process, alternating rounds of --steps steps with ours
(3 rounds each; the median round counts), and reports the slot-throughput ratio.
Preference stages (rm, dpo) also report pairs_per_s. DPO's FLOPs count the policy's forward and
backward plus, with `reference=in_step`, the reference's forward. --compare_reference times the
DPO step with the reference in the step and with precomputed log-probs on the same batches.
--remat_table compiles the step for remat none/full with k = 1, 2, 4 layers per checkpoint unit and
reports compiled peak memory and step time for each.

--generate times `aj.generate` on the preset's model (fresh params) instead of a training step: prefill
tokens/s (prompt tokens / time of a call with one new token) and decode tokens/s (the remaining
new tokens / the extra time of a full call), greedy, no eos, so every row runs to the end. With
--compare_torch the same weights (via save_pretrained -> from_pretrained) run through transformers'
`generate` (greedy, sdpa, CPU torch) on the same batch, timed the same way.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from align_jax.host import tune_host_allocator


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    if m is None:
        return -1
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def time_steps(step_fn, state, batches, n: int, warmup: int = 5) -> tuple[object, float]:
    """Mean seconds per step over `n` steps, after `warmup` untimed steps: compilation, first
    dispatches, and the malloc heap settling into reusing the step's scratch memory
    (align_jax/host.py), which takes a few steps."""
    for i in range(warmup):
        state, metrics = step_fn(state, batches[i % len(batches)])
    if warmup:
        jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for i in range(n):
        state, metrics = step_fn(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t0) / n


def make_run(config, workdir: str):
    """The stage's run (built through its spec, as training builds it) and its initial state (no
    checkpointer: nothing to resume; no start hook: DPO's precomputed reference log-probs of the timed
    batches come from `with_reference_logps`, not from a pass over the dataset)."""
    from align_jax import stages
    from align_jax.stages import runner

    if config.stage not in ("sft", "rm", "dpo"):
        raise SystemExit(f"bench: stage {config.stage!r} is not benchmarked")
    run = runner.Run(stages.get(config.stage).spec, config, workdir)
    return run, run.initial_state(None, start=False)[0]


def with_reference_logps(run, state, batches: list) -> list:
    """Precomputed-reference batches: the reference is the initial policy, so its log-probs of the timed
    batches come from the state's params (what the cache would hold), without a pass over the dataset."""
    from align_jax.stages.dpo import reference_logps_fn

    fn = reference_logps_fn(run)
    reference = state.frozen if run.lora is not None else state.params  # LoRA: the base, adapters off
    return [{**b, "ref_logps": fn(reference, b)} for b in batches]


def bench_stage(config, steps: int, workdir: str) -> dict:
    from align_jax.metrics import device_peak_flops
    from align_jax.stages.dpo import reference_mode
    from align_jax.train import loop

    run, state = make_run(config, workdir)
    hosts = [next(run.train_iter) for _ in range(min(steps, 8))]
    batches = [run.global_batch(h) for h in hosts]
    if config.stage == "dpo" and reference_mode(config) == "precomputed":
        batches = with_reference_logps(run, state, batches)
    stats = [loop.batch_stats(h) for h in hosts]

    # Ahead-of-time compile for the compile time and the memory analysis; the timed steps then go
    # through the jit cache like a training run, and every entry they add is a compilation.
    t0 = time.perf_counter()
    compiled = run.step_fn.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    before = run.step_fn._cache_size()
    state, step_s = time_steps(run.step_fn, state, batches, steps)
    n_compiles = run.step_fn._cache_size() - before

    real = np.mean([s["real_tokens"] for s in stats])
    slots = np.mean([s["token_slots"] for s in stats])
    ctx = float(np.average([s["avg_context"] for s in stats], weights=[s["real_tokens"] for s in stats]))
    cfg = run.model_cfg
    peak = float(config.train.peak_flops) or device_peak_flops(jax.devices()[0])
    flops = run.flops_per_token(ctx) * real / step_s
    out = {
        "preset_stage": config.stage,
        "tokens_per_s": real / step_s,
        "slots_per_s": slots / step_s,
        "mfu": flops / (peak * jax.device_count()) if peak else 0.0,
        "tflops_per_s": flops / 1e12,
        "packing_efficiency": float(run.train_iter.stats().get("packing_efficiency", real / slots)),
        "batch_fill": real / slots,
        "compile_s": compile_s,
        "step_s": step_s,
        "peak_bytes": peak_bytes(compiled),
        "n_compiles": n_compiles,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "seq_len": int(config.data.seq_len),
        "batch_size": int(config.data.batch_size),
        "n_params": cfg.num_params(),
        "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype,
        "remat_policy": cfg.remat_policy,
        "layers_per_unit": cfg.layers_per_unit,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
        "_run": run,
        "_batches": batches,
        "_state": state,
    }
    if "pair_mask" in hosts[0]:
        out["pairs_per_s"] = float(np.mean([h["pair_mask"].sum() for h in hosts])) / step_s
    if config.stage == "dpo":
        out["reference"] = reference_mode(config)
        out["loss_type"] = config.loss_type
    return out


def reference_comparison(config, steps: int, workdir: str) -> dict:
    """DPO step time with the reference in the step vs. precomputed log-probs, same shape and batches."""
    out = {}
    for mode in ("in_step", "precomputed"):
        c = config.copy_and_resolve_references()
        c.unlock()
        c.reference = mode
        r = bench_stage(c, steps, os.path.join(workdir, f"ref_{mode}"))
        out[mode] = {k: r[k] for k in ("step_s", "pairs_per_s", "tokens_per_s", "tflops_per_s", "mfu", "peak_bytes")}
    out["step_time_cut"] = 1.0 - out["precomputed"]["step_s"] / out["in_step"]["step_s"]
    return out


def torch_step(result: dict):
    """One training step of the same model shape and batch through transformers + torch AdamW."""
    import torch
    import transformers

    from align_jax.models.hf_config import to_hf_dict

    cfg = result["_run"].model_cfg
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_dict(cfg))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (result["batch_size"], result["seq_len"]))

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, torch.get_num_threads()


def bench_torch(result: dict, steps: int, rounds: int = 3) -> dict:
    """Our step and torch's, timed side by side in alternating rounds of `steps` steps, so that load
    drifting on a shared machine hits both alike; each side's time is its median round."""
    step, threads = torch_step(result)
    run, batches = result["_run"], result["_batches"]
    state = result["_state"]
    for _ in range(2):
        step()

    def ours() -> float:
        nonlocal state
        state, step_s = time_steps(run.step_fn, state, batches, steps, warmup=0)
        return step_s

    def theirs() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps

    times = [(ours(), theirs()) for _ in range(rounds)]
    result["_state"] = state
    ours_s, torch_s = (float(np.median(side)) for side in zip(*times, strict=True))
    slots = result["batch_size"] * result["seq_len"]
    return {
        "torch_step_s": torch_s,
        "torch_slots_per_s": slots / torch_s,
        "torch_threads": threads,
        "side_by_side_step_s": ours_s,
        "side_by_side_rounds": [[round(a, 4), round(b, 4)] for a, b in times],
        "slots_ratio_vs_torch": torch_s / ours_s,
    }


def remat_table(config, workdir: str) -> list[dict]:
    rows = []
    for policy, k in [("none", 1), ("full", 1), ("full", 2), ("full", 4)]:
        if config.model.num_layers % k:
            continue
        c = config.copy_and_resolve_references()
        c.unlock()
        c.model.remat_policy, c.model.layers_per_unit = policy, k
        r = bench_stage(c, steps=3, workdir=os.path.join(workdir, f"remat_{policy}_{k}"))
        rows.append(
            {"remat_policy": policy, "layers_per_unit": k, "peak_bytes": r["peak_bytes"], "step_s": r["step_s"]}
        )
    return rows


from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps after warm-up")
_TORCH = flags.DEFINE_bool("compare_torch", False, "also time transformers + torch AdamW on the same shape")
_REMAT = flags.DEFINE_bool("remat_table", False, "compiled peak memory and step time for remat k = 1, 2, 4")
_REF = flags.DEFINE_bool(
    "compare_reference", False, "dpo: step time with the reference in the step vs. precomputed log-probs"
)
_GEN = flags.DEFINE_bool("generate", False, "time aj.generate (prefill and decode tokens/s) instead of training")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 8, "--generate: prompts per batch")
_GEN_PROMPT = flags.DEFINE_integer("gen_prompt", 64, "--generate: prompt length")
_GEN_NEW = flags.DEFINE_integer("gen_new", 128, "--generate: new tokens per prompt")
_GEN_REPEATS = flags.DEFINE_integer("gen_repeats", 5, "--generate: timed calls (the best is reported)")
flags.mark_flags_as_required(["config"])


def main_generate(config) -> int:
    from bench_generate import bench_generate

    r = bench_generate(config, _GEN_BATCH.value, _GEN_PROMPT.value, _GEN_NEW.value, _GEN_REPEATS.value, _TORCH.value)
    line = (
        f"generate: batch {r['batch_size']}, prompt {r['prompt_len']}, {r['new_tokens']} new: prefill "
        f"{r['prefill_tokens_per_s']:.0f} tok/s, decode {r['decode_tokens_per_s']:.0f} tok/s, compile "
        f"{r['compile_s']:.1f}s, {r['n_params'] / 1e6:.1f}M params"
    )
    if "decode_ratio_vs_torch" in r:
        line += (
            f" | torch prefill {r['torch_prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{r['torch_decode_tokens_per_s']:.0f} tok/s -> ratio prefill {r['prefill_ratio_vs_torch']:.2f}x, "
            f"decode {r['decode_ratio_vs_torch']:.2f}x"
        )
    print(line)
    print(json.dumps(r))
    return 0


def main(argv) -> int:
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    config = _CONFIG.value
    config.unlock()
    config.train.progress = False
    if _GEN.value:
        return main_generate(config)
    with tempfile.TemporaryDirectory() as workdir:
        result = bench_stage(config, _STEPS.value, workdir)
        if _TORCH.value:
            result.update(bench_torch(result, _STEPS.value))
        if _REMAT.value:
            result["remat_table"] = remat_table(config, workdir)
        if _REF.value:
            if config.stage != "dpo":
                raise SystemExit("--compare_reference is for configs/dpo.py presets")
            result["reference_comparison"] = reference_comparison(config, _STEPS.value, workdir)
    result = {k: v for k, v in result.items() if not k.startswith("_")}
    line = (
        f"{config.stage}: {result['tokens_per_s']:.0f} tok/s ({result['slots_per_s']:.0f} slots/s), step {result['step_s'] * 1e3:.1f} ms, "
        f"MFU {result['mfu']:.1%}, packing {result['packing_efficiency']:.1%}, compile {result['compile_s']:.1f}s, "
        f"peak {result['peak_bytes'] / 2**20:.0f} MiB, {result['n_compiles']} compile(s), {result['n_params'] / 1e6:.1f}M params"
    )
    if "pairs_per_s" in result:
        line += f", {result['pairs_per_s']:.1f} pairs/s"
    if "reference_comparison" in result:
        rc = result["reference_comparison"]
        line += (
            f" | reference in step {rc['in_step']['step_s'] * 1e3:.1f} ms vs precomputed "
            f"{rc['precomputed']['step_s'] * 1e3:.1f} ms: {rc['step_time_cut']:.1%} less"
        )
    if "slots_ratio_vs_torch" in result:
        line += (
            f" | side by side (median of 3 alternating rounds): ours {result['side_by_side_step_s'] * 1e3:.1f} ms, "
            f"torch {result['torch_step_s'] * 1e3:.1f} ms ({result['torch_slots_per_s']:.0f} slots/s) "
            f"-> ratio {result['slots_ratio_vs_torch']:.2f}x"
        )
    print(line)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from align_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
