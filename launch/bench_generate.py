"""Sampler benchmarks on a preset's model (fresh params).

`launch/bench.py --generate` (the function `bench_generate`): `aj.generate` on one fixed batch, greedy,
no eos, so every row runs to the end: prefill tokens/s and decode tokens/s; with --compare_torch, the same
weights through transformers' `generate` on the same batch (see launch/bench.py's docstring). The refill
engine (`generate_many`, slots = the batch) is timed on the same batch beside it.

`python launch/bench_generate.py --config configs/sft.py:<preset> [--prompts 64] [--slots 8]
[--max_prompt 64] [--new 128] [--mean_len 32] [--repeats 3] [--compare_torch]`: a workload whose
response lengths vary, as RL rollouts' do: `--prompts` prompts of uniform random lengths in
[8, max_prompt], sampled at temperature 1 with up to `--new` tokens, and a set of "eos" ids of
vocab / mean_len tokens. A fresh model's next-token distribution is near uniform, so each step ends a
row with probability ~1 / mean_len: response lengths are roughly geometric (the measured mean is
reported). Compared, all over the same prompts in the same process, calls interleaved, best of
--repeats: plain `generate` in batches of --slots prompts (each batch runs until its longest row ends),
plain `generate` on all the prompts in one batch (what a GRPO rollout does), `generate_many` with --slots
decode slots, and with --compare_torch transformers' `generate` in batches of
--slots (left-padded, sampling, the same eos ids). tokens/s counts generated tokens (the eos included)
per second of wall time, prefill included; each side counts its own samples (transformers' differ:
another RNG, the same distribution).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np


class _NoTokenizer:
    """Stands in for a tokenizer when only the model shape matters (fresh params, no text)."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __len__(self) -> int:
        return 0


def best_times(fns, repeats: int) -> list[float]:
    """The best wall time of each function, calls interleaved so that load changes hit all alike."""
    for fn in fns:
        fn()  # warm up (compile)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def bench_generate(config, batch: int, prompt: int, new: int, repeats: int, compare_torch: bool) -> dict:
    import align_jax as aj
    from align_jax.engine import generate_many
    from align_jax.generate import compile_count
    from align_jax.stages import build

    sharder = build.make_sharder(config)
    cfg = build.model_config(config, _NoTokenizer())
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, prompt + new))
    params = aj.init_params(cfg, jax.random.key(0), sharder)
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, prompt)).astype(np.int32)

    def run(n):
        out = aj.generate(cfg, params, prompts, max_new_tokens=n, eos_id=(), sharder=sharder)
        return jax.block_until_ready(out)

    def run_engine():  # the same batch through the refill engine, one slot per row
        out = generate_many(cfg, params, prompts, max_new_tokens=new, eos_id=(), slots=batch, sharder=sharder)
        return jax.block_until_ready(out)

    before = compile_count()
    t0 = time.perf_counter()
    run(new)
    compile_s = time.perf_counter() - t0
    prefill_s, total_s, engine_s = best_times([lambda: run(1), lambda: run(new), run_engine], repeats)
    out = {
        "mode": "generate",
        "batch_size": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "prefill_tokens_per_s": batch * prompt / prefill_s,
        "decode_tokens_per_s": batch * (new - 1) / (total_s - prefill_s),
        "generate_tokens_per_s": batch * new / total_s,
        "engine_tokens_per_s": batch * new / engine_s,  # generate_many, slots = batch
        "prefill_s": prefill_s,
        "total_s": total_s,
        "compile_s": compile_s,
        "n_compiles": compile_count() - before,  # 2 expected: one program for 1 new token, one for `new`
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "n_params": cfg.num_params(),
        "dtype": cfg.dtype,
        "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
    }
    if compare_torch:
        out.update(bench_torch_generate(cfg, params, prompts, new, repeats, np.asarray(run(new).tokens)))
        out["prefill_ratio_vs_torch"] = out["prefill_tokens_per_s"] / out["torch_prefill_tokens_per_s"]
        out["decode_ratio_vs_torch"] = out["decode_tokens_per_s"] / out["torch_decode_tokens_per_s"]
    return out


def bench_torch_generate(cfg, params, prompts, new: int, repeats: int, ours) -> dict:
    import torch
    import transformers

    import align_jax as aj

    with tempfile.TemporaryDirectory() as d:
        aj.save_pretrained(cfg, params, d)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )

    prefill_s, total_s = best_times([lambda: run(1), lambda: run(new)], repeats)
    theirs = run(new)[:, prompts.shape[1] :].numpy()
    b, p = prompts.shape
    return {
        "torch_prefill_tokens_per_s": b * p / prefill_s,
        "torch_decode_tokens_per_s": b * (new - 1) / (total_s - prefill_s),
        "torch_generate_tokens_per_s": b * new / total_s,
        "torch_threads": torch.get_num_threads(),
        # Same weights, both fp32 greedy: the continuations agree up to float rounding at near-ties.
        "torch_same_tokens": float(np.mean(theirs == ours)),
    }


def varied_workload(vocab: int, n_prompts: int, max_prompt: int, mean_len: float, seed: int = 0):
    """(prompts, eos ids): prompt lengths uniform in [8, max_prompt]; vocab / mean_len eos ids, so that a
    near-uniform next-token distribution ends a row with probability ~1 / mean_len per step."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min(8, max_prompt), max_prompt + 1, size=n_prompts)
    prompts = [rng.integers(3, vocab, size=int(n)).tolist() for n in lengths]
    eos = list(range(3, 3 + max(1, round(vocab / mean_len))))
    return prompts, eos


def bench_varied(config, n_prompts: int, slots: int, max_prompt: int, new: int, mean_len: float, repeats: int,
                 compare_torch: bool, engine_kw: dict | None = None) -> dict:  # fmt: skip
    """Plain `generate` in batches of `slots`, `generate_many` with `slots` slots and (optionally)
    transformers in batches of `slots`, on the varied workload; tokens/s of generated tokens."""
    import align_jax as aj
    from align_jax.engine import compile_count, generate_many
    from align_jax.stages import build

    sharder = build.make_sharder(config)
    cfg = build.model_config(config, _NoTokenizer())
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max_prompt + new))
    params = aj.init_params(cfg, jax.random.key(0), sharder)
    prompts, eos = varied_workload(cfg.vocab_size, n_prompts, max_prompt, mean_len)
    kw = dict(max_new_tokens=new, temperature=1.0, eos_id=eos, seed=0, sharder=sharder)
    counts = {}

    def plain():
        # Each batch at its own bucket, as a caller would pass them; in the prompts' order.
        outs = [aj.generate(cfg, params, prompts[i : i + slots], **kw) for i in range(0, n_prompts, slots)]
        counts["generate"] = int(sum(np.asarray(o.lengths).sum() for o in jax.block_until_ready(outs)))

    def plain_all():  # the whole workload as one batch, as a GRPO rollout calls `generate` now
        counts["generate_all"] = int(
            np.asarray(jax.block_until_ready(aj.generate(cfg, params, prompts, **kw)).lengths).sum()
        )

    def engine():
        out = generate_many(cfg, params, prompts, slots=slots, **kw, **(engine_kw or {}))
        counts["engine"] = int(out.lengths.sum())

    fns = {"generate": plain, "generate_all": plain_all, "engine": engine}
    if compare_torch:
        fns["torch"] = torch_varied(cfg, params, prompts, slots, new, eos, counts)
    t0 = time.perf_counter()
    engine()
    engine_first_s = time.perf_counter() - t0
    before = compile_count()
    times = dict(zip(fns, best_times(list(fns.values()), repeats), strict=True))
    out = {"mode": "generate_varied", "prompts": n_prompts, "slots": slots, "max_prompt": max_prompt,
           "new_tokens": new, "eos_ids": len(eos), "n_params": cfg.num_params(), **(engine_kw or {}),
           "engine_first_call_s": engine_first_s, "engine_new_compiles": compile_count() - before}  # fmt: skip
    for name, sec in times.items():
        out[f"{name}_s"] = sec
        out[f"{name}_tokens"] = counts[name]
        out[f"{name}_mean_len"] = counts[name] / n_prompts
        out[f"{name}_tokens_per_s"] = counts[name] / sec
    for name in times:
        if name != "engine":
            out[f"engine_ratio_vs_{name}"] = out["engine_tokens_per_s"] / out[f"{name}_tokens_per_s"]
    out["devices"] = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
    if compare_torch:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    return out


def torch_varied(cfg, params, prompts, slots: int, new: int, eos: list[int], counts: dict):
    """transformers' sampling `generate` over the prompts in batches of `slots`, left-padded."""
    import torch
    import transformers

    import align_jax as aj

    with tempfile.TemporaryDirectory() as d:
        aj.save_pretrained(cfg, params, d)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    batches = []
    for i in range(0, len(prompts), slots):
        group = prompts[i : i + slots]
        width = max(map(len, group))
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(group):
            ids[r, width - len(p) :] = torch.as_tensor(p)
            mask[r, width - len(p) :] = 1
        batches.append((ids, mask))

    def run():
        total = 0
        torch.manual_seed(0)
        with torch.no_grad():
            for ids, mask in batches:
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=True,
                                     temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=0)  # fmt: skip
                reply = out[:, ids.shape[1] :].numpy()
                hit = np.isin(reply, eos)
                # A row's length: up to and including its first eos, else all `new` tokens.
                total += int(np.where(hit.any(1), hit.argmax(1) + 1, reply.shape[1]).sum())
        counts["torch"] = total

    return run


def main(argv) -> int:
    from align_jax.host import tune_host_allocator

    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    config = _CONFIG.value
    config.unlock()
    r = bench_varied(config, _PROMPTS.value, _SLOTS.value, _MAX_PROMPT.value, _NEW.value, _MEAN_LEN.value,
                     _REPEATS.value, _TORCH.value, dict(chunk=_CHUNK.value, prefill_rows=_PREFILL_ROWS.value))  # fmt: skip
    line = (
        f"varied lengths: {r['prompts']} prompts, {r['slots']} slots, mean response "
        f"{r['engine_mean_len']:.1f} tokens: generate {r['generate_tokens_per_s']:.0f} tok/s (all in one batch "
        f"{r['generate_all_tokens_per_s']:.0f}), engine {r['engine_tokens_per_s']:.0f} tok/s "
        f"({r['engine_ratio_vs_generate']:.2f}x, {r['engine_ratio_vs_generate_all']:.2f}x)"
    )
    if "torch_tokens_per_s" in r:
        line += f", torch {r['torch_tokens_per_s']:.0f} tok/s (engine {r['engine_ratio_vs_torch']:.2f}x)"
    print(line)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from absl import app, flags
    from ml_collections import config_flags

    from align_jax.cli import parse_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sft.py:<preset>", lock_config=True)
    _PROMPTS = flags.DEFINE_integer("prompts", 64, "prompts in the workload")
    _SLOTS = flags.DEFINE_integer("slots", 8, "decode slots (and plain generate's / transformers' batch)")
    _MAX_PROMPT = flags.DEFINE_integer("max_prompt", 64, "prompt lengths are uniform in [8, max_prompt]")
    _NEW = flags.DEFINE_integer("new", 128, "max new tokens per prompt")
    _MEAN_LEN = flags.DEFINE_float("mean_len", 32.0, "vocab / mean_len eos ids: ~geometric response lengths")
    _REPEATS = flags.DEFINE_integer("repeats", 3, "timed passes over the workload (the best is reported)")
    _CHUNK = flags.DEFINE_integer("chunk", 16, "the engine's decode steps between host round trips (at most)")
    _PREFILL_ROWS = flags.DEFINE_integer("prefill_rows", 1, "the engine's prompts per prefill call")
    _TORCH = flags.DEFINE_bool("compare_torch", False, "also time transformers' generate on the workload")
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
