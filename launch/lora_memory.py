"""Memory of a LoRA / QLoRA train state, from shapes alone, against full fine-tuning; and (--compile) the
compiled memory of one SFT step at a short sequence length.

    python launch/lora_memory.py [--preset llama3_8b] [--rank 16] [--seq_len 256] [--batch 1] [--compile]

The model is the preset's architecture (configs/sft.py; llama3_8b: Llama-3-8B, 32 layers, hidden 4096,
128k vocab, untied) with its runtime settings (bf16 compute, full remat, fp32 params and Adam moments).
Bytes come from `jax.eval_shape` of the state the driver builds (align_jax/lora/plan.py): nothing is
allocated. With --compile, each variant's train step is lowered on abstract inputs on one device and
compiled, and XLA's memory analysis (arguments, outputs, temporaries) is printed: on CPU about ten
seconds per variant. Prints a table, then (last line) one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Real-model shapes the presets take from an HF config.json (init_from), which this script does not read.
ARCHITECTURES = {
    "llama3_8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
}
ARCHITECTURES["llama3_8b_qlora"] = ARCHITECTURES["llama3_8b"]
GB = 1e9


def preset_config(preset: str, rank: int, quantize: str, seq_len: int, batch: int, layers_per_unit: int = 0):
    """configs/sft.py:<preset> with config.lora set, and its ModelConfig."""
    import importlib.util

    from align_jax.config.sections import lora_fields
    from align_jax.models.config import RUNTIME_FIELDS, ModelConfig

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sft.py")
    spec = importlib.util.spec_from_file_location("configs_sft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(preset)
    c.unlock()
    c.lora.update(rank=rank, quantize=quantize)
    c.data.update(seq_len=seq_len, batch_size=batch)
    c.train.microbatches = 1
    if layers_per_unit:
        c.model.layers_per_unit = layers_per_unit
    runtime = {k: c.model[k] for k in RUNTIME_FIELDS}
    return c, ModelConfig(**ARCHITECTURES[preset], **runtime, **lora_fields(c))


def state_sizes(config, cfg, *, compile_step: bool = False) -> dict:
    """Bytes of trainable params, optimizer state and frozen base (full fine-tuning: no frozen base) from
    shapes; with `compile_step`, XLA's memory analysis of one compiled SFT step."""
    import jax
    import jax.numpy as jnp

    from align_jax import checkpoint
    from align_jax.lora import model_apply_fn, tree
    from align_jax.lora.plan import LoraPlan
    from align_jax.losses.sft import sft_loss
    from align_jax.models.hf import abstract_params
    from align_jax.models.transformer import Decoder
    from align_jax.sharding import Sharder, make_mesh
    from align_jax.stages import build
    from align_jax.stages.spec import ParamsInit
    from align_jax.train.step import make_train_step

    sharder = Sharder(make_mesh({"data": 1}, jax.devices()[:1]))
    boxed = abstract_params(cfg, sharder)
    plan = None
    if cfg.lora_rank:
        plan = LoraPlan(ParamsInit(boxed, fresh=lambda rng: None), cfg, sharder, config)
        boxed = plan.boxed_trainable
    setup = build.setup_state(cfg, sharder, config, boxed_abstract=boxed)
    out = {
        "params_bytes": tree.nbytes(setup.abstract_state.params),
        "opt_state_bytes": tree.nbytes(setup.abstract_state.opt_state),
        "frozen_bytes": tree.nbytes(plan.frozen_abstract) if plan else 0,
    }
    if not compile_step:
        return out
    state, shardings = setup.abstract_state, setup.state_shardings
    loss_fn = functools.partial(
        sft_loss,
        apply_fn=model_apply_fn(Decoder(cfg, sharder)),
        z_loss=0.0,
        loss_chunk=int(config.train.loss_chunk),
    )
    if plan is not None:
        shardings = shardings.replace(frozen=plan.frozen_shardings)
        state = state.replace(frozen=checkpoint.abstract_with_shardings(plan.frozen_abstract, plan.frozen_shardings))
        loss_fn = plan.loss(loss_fn, train=True)
    fields = ("tokens", "positions", "segment_ids", "loss_mask")
    batch_shardings = setup.batch_shardings(fields)
    shape = (int(config.data.batch_size), int(config.data.seq_len))
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_shardings[k]) for k in fields}
    step = make_train_step(loss_fn, setup.optimizer, state_shardings=shardings, batch_shardings=batch_shardings)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    m = compiled.memory_analysis()
    out.update(
        compile_s=round(time.perf_counter() - t0, 1),
        step_argument_bytes=int(m.argument_size_in_bytes),
        step_output_bytes=int(m.output_size_in_bytes),
        step_temp_bytes=int(m.temp_size_in_bytes),
        step_alias_bytes=int(m.alias_size_in_bytes),
        step_peak_bytes=int(
            m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        ),
    )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3_8b", choices=sorted(ARCHITECTURES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256, help="for --compile: the step's sequence length")
    p.add_argument("--batch", type=int, default=1, help="for --compile: rows per step")
    p.add_argument("--compile", action="store_true", help="also compile one SFT step per variant (~10 s each)")
    p.add_argument("--layers_per_unit", type=int, default=0, help="override the preset's remat unit (0: keep)")
    a = p.parse_args()
    rows = {}
    for name, rank, quantize in (("full", 0, "none"), ("lora", a.rank, "none"), ("qlora", a.rank, "nf4")):
        config, cfg = preset_config(a.preset, rank, quantize, a.seq_len, a.batch, a.layers_per_unit)
        rows[name] = state_sizes(config, cfg, compile_step=a.compile)
        r = rows[name]
        line = f"{name:>6}: params {r['params_bytes'] / GB:7.3f} GB  optimizer {r['opt_state_bytes'] / GB:7.3f} GB"
        line += f"  frozen base {r['frozen_bytes'] / GB:7.3f} GB"
        if a.compile:
            line += f"  | step (T={a.seq_len}, B={a.batch}): peak {r['step_peak_bytes'] / GB:7.3f} GB"
            line += f", temporaries {r['step_temp_bytes'] / GB:6.3f} GB (compiled in {r['compile_s']} s)"
        print(line, flush=True)
    print(json.dumps({"preset": a.preset, "rank": a.rank, **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
