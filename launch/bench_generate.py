"""`launch/bench.py --generate`: times `aj.generate` on a preset's model (fresh params) instead of a
training step: prefill tokens/s and decode tokens/s, greedy, no eos; with --compare_torch, the same
weights through transformers' `generate` on the same batch (see launch/bench.py's docstring)."""

from __future__ import annotations

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

    before = compile_count()
    t0 = time.perf_counter()
    run(new)
    compile_s = time.perf_counter() - t0
    prefill_s, total_s = best_times([lambda: run(1), lambda: run(new)], repeats)
    out = {
        "mode": "generate",
        "batch_size": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "prefill_tokens_per_s": batch * prompt / prefill_s,
        "decode_tokens_per_s": batch * (new - 1) / (total_s - prefill_s),
        "generate_tokens_per_s": batch * new / total_s,
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
