"""DPO family: preference optimisation of a policy against a frozen reference (or reference-free).

    python launch/train.py --config configs/dpo.py:<preset> --workdir DIR --config.init_from=SFT_WORKDIR

Policy and reference both start from init_from (an SFT workdir or an HF directory). The top-level keys pick
the objective: loss_type = sigmoid (DPO; label_smoothing > 0 gives cDPO) | sigmoid_norm | hinge | ipo |
robust | exo_pair | bco_pair | sppo_hard | nca_pair | apo_zero | apo_down | aot | aot_unpaired | discopop |
simpo | orpo | kto (TRL 1.x's meanings), with beta, gamma (SimPO), rpo_alpha (an NLL term on the chosen
response), bco_shift (none, as TRL 1.x, or batch_mean, older TRL's reward shift), discopop_tau,
desirable/undesirable weights (KTO; set --config.data.unpaired=True to train KTO on paired data).
Reference log-probs are either computed by the frozen reference in every step (`reference=in_step`) or
once before training and cached on disk (`reference=precomputed`, cache in ref_cache_dir), which drops
the reference's forward pass and its weights from the step.

Presets:
  tiny       The CPU demo, after `configs/sft.py:tiny` (--config.init_from=runs/sft-demo): sigmoid DPO,
             beta 0.1, on the bundled demo preference pairs. 2-core CPU: ~55 s for 150 steps (0.26 s/step
             with the reference in the step, 0.22 s precomputed); train reward accuracy 0.70 -> 0.92,
             held-out reward margin 2.2 / 2.9 / 3.0 and accuracy 76% / 82% / 80% at steps 50 / 100 / 150.
  small30m   The ~30M-parameter benchmark shape of configs/sft.py:small30m (10 layers, hidden 512, 8 rows
             of 512 tokens), from scratch with the demo tokenizer: for `launch/bench.py`.
  llama3_8b  Llama-3-8B DPO from an SFT workdir (--config.init_from) on your preference data: 8x
             H100/H200 or TPU v5p-8, mesh fsdp=8, seq_len 4096, 64 rows of packed pairs per step in 4
             microbatches, full remat, bf16, precomputed reference log-probs. Estimate, not measured: 6 x
             8.0e9 x 262k tokens = 1.3e16 FLOP/step (+1/3 with an in-step reference), ~4 s/step at 40% MFU.
             Fit (launch/plan.py, compiled for the slice; docs/benchmarks.md): v5p-8 60.6 of 95 GiB per
             chip; v5e-16 only with --config.model.layers_per_unit=2 (15.7 of 16 GiB); v5p-128 with
             --config.train.microbatches=1.
  qwen2_7b   Qwen2/2.5-7B, same layout as llama3_8b. Fit (launch/plan.py): v5p-8 57.5 of 95 GiB per
             chip, v5e-16 14.8 of 16 GiB as set, v5p-128 with --config.train.microbatches=1.
  llama3_70b Llama-3(.1)-70B DPO: 64 H100s or a TPU v5p-128, mesh fsdp=16 x tensor=4 (x data for the
             rest), 128 rows of packed pairs per step in 8 microbatches, remat one unit per 2 layers,
             precomputed reference log-probs. Fit (launch/plan.py): not v5p-8 (the train state alone is
             197 GiB per chip); v5p-128 as the SFT preset (the reference is not in the step).
"""

from align_jax.config import base_config


def get_config(arg: str = "tiny"):
    c = base_config("dpo")
    c.data.train = "demo:pref_train"
    c.data.eval = "demo:pref_eval"
    if arg == "tiny":
        c.model.dtype = "float32"
        c.model.scan_unroll = 4
        c.data.update(seq_len=256, batch_size=16, max_pairs=8)
        c.update(loss_type="sigmoid", beta=0.1)
        c.optim.update(lr=5e-4, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
        c.train.update(steps=150, log_every=10, eval_every=50, ckpt_every=50)
    elif arg == "small30m":
        # The ~30M benchmark shape of configs/sft.py:small30m, from scratch with the demo tokenizer
        # unless init_from is given: for `launch/bench.py`, not for quality.
        c.tokenizer = "demo"
        c.model.update(
            vocab_size=512, hidden_size=512, intermediate_size=1408, num_layers=10, num_heads=8, num_kv_heads=4
        )
        c.model.dtype = "float32"
        c.data.update(seq_len=512, batch_size=8, max_pairs=16)
        c.optim.update(lr=1e-4, warmup_steps=10)
        c.train.update(steps=100, log_every=10, eval_every=50, ckpt_every=50)
        c.data.eval_batches = 4
    elif arg in ("llama3_8b", "qwen2_7b"):
        c.mesh.update(data=1, fsdp=-1)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.data.update(seq_len=4096, batch_size=64, max_pairs=64)
        c.update(loss_type="sigmoid", beta=0.1, reference="precomputed")
        c.optim.update(lr=5e-7, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0)
        c.train.update(steps=1000, microbatches=4, loss_chunk=1024, log_every=10, eval_every=100, ckpt_every=100)
        c.data.eval_batches = 20
    elif arg == "llama3_70b":
        c.mesh.update(data=-1, fsdp=16, tensor=4)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=2)
        c.data.update(seq_len=4096, batch_size=128, max_pairs=64)
        c.update(loss_type="sigmoid", beta=0.1, reference="precomputed")
        c.optim.update(lr=5e-7, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0)
        c.train.update(steps=1000, microbatches=8, loss_chunk=1024, log_every=10, eval_every=100, ckpt_every=100)
        c.data.eval_batches = 20
    else:
        raise ValueError(
            f"configs/dpo.py: unknown preset {arg!r}; presets: tiny, small30m, llama3_8b, qwen2_7b, llama3_70b"
        )
    c.lock()
    return c
