"""RM: a reward model (decoder + scalar head) on preference pairs, Bradley-Terry + absolute-score MSE.

    python launch/train.py --config configs/rm.py:<preset> --workdir DIR --config.init_from=SFT_WORKDIR

The RM starts from an SFT workdir (or an HF directory) with a fresh scalar head; the reward of a
response is the head's value at its last token (the end-of-turn token). Loss (its top-level keys): the
report's Eq. 1, -log sigmoid(r_c - r_r - margin) + score_weight * [(r_c - s_c)^2 + (r_r - s_r)^2] where
s are the rows' absolute scores, z-normalised over the train split (rows without scores: BT only).
Score a trained RM with `python launch/score.py --workdir DIR --input pairs.jsonl`.

Presets:
  tiny       The CPU demo, after `configs/sft.py:tiny` (--config.init_from=runs/sft-demo): the bundled
             demo preference pairs (align_jax/data/demo/pref_*.jsonl, half with 1-10 scores), ~3 pairs
             per packed 256-token row, 99.2% of slots used. 2-core CPU: ~45 s for 150 steps; held-out
             pair accuracy 80% / 83% / 84% at steps 50 / 100 / 150, eval margin 1.3 -> 1.5.
  small30m   The ~30M-parameter benchmark shape of configs/sft.py:small30m (10 layers, hidden 512, 8 rows
             of 512 tokens), from scratch with the demo tokenizer: for `launch/bench.py`.
  llama3_8b  A Llama-3-8B RM from an SFT workdir or HF directory on your preference data
             (--config.data.train=...): 8x H100/H200 or TPU v5p-8, mesh fsdp=8, seq_len 4096, 128 rows of
             packed pairs per step in 4 microbatches, full remat, bf16. Estimate, not measured: a forward
             and backward of 6 x 7.5e9 params x 524k tokens = 2.4e16 FLOP/step, ~7.5 s/step at 40% MFU.
  qwen2_7b   Qwen2/2.5-7B, same layout as llama3_8b.
"""

from align_jax.config import base_config


def get_config(arg: str = "tiny"):
    c = base_config("rm")
    c.data.train = "demo:pref_train"
    c.data.eval = "demo:pref_eval"
    c.update(margin=0.0, score_weight=0.1, center_weight=0.0)
    if arg == "tiny":
        c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32
        c.model.scan_unroll = 4
        c.data.update(seq_len=256, batch_size=16, max_pairs=8)
        c.optim.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
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
        c.data.update(seq_len=4096, batch_size=128, max_pairs=64)
        c.optim.update(lr=5e-6, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0)
        c.train.update(steps=1000, microbatches=4, log_every=10, eval_every=100, ckpt_every=100)
        c.data.eval_batches = 20
    else:
        raise ValueError(f"configs/rm.py: unknown preset {arg!r}; presets: tiny, small30m, llama3_8b, qwen2_7b")
    c.lock()
    return c
