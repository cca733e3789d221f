"""SFT: supervised fine-tuning on packed chat data (assistant tokens only by default).

    python launch/train.py --config configs/sft.py:<preset> --workdir DIR [--config.key=value ...]

Presets:
  tiny       The CPU demo. Trains a byte-level BPE (512 tokens) and a 4-layer, ~0.9M-parameter Llama-
             style model from scratch on the bundled demo chats (align_jax/data/demo). 2-core CPU:
             ~70 s for 300 steps (4.8 it/s); train loss 3.6 at step 20 -> ~0.5, eval loss 1.28 / 0.66 /
             0.52 at steps 100 / 200 / 300, eval token accuracy 82%.
  calculator_tiny  The calculator tool demo's first stage (then configs/grpo.py:calculator_tiny): the
             `tiny` model and a 512-token BPE trained on these chats, from scratch on
             demo:calculator_sft (align_jax/envs/make_calculator_data.py: word problems, some solved
             through a `<calc>` call and the tool's reply, some answered at once). 1000 steps: eval loss
             0.985 / 0.535 / 0.377 / 0.324 at steps 250 / 500 / 750 / 1000, token accuracy 89%; ~12 min
             (1.44 it/s) on a 2-core CPU shared with other jobs.
  small30m   The ~30M-parameter benchmark shape (10 layers, hidden 512) on the demo data; for
             `launch/bench.py` on CPU and as a quick GPU check. 2-core CPU: ~3.6 s/step (8 x 512
             tokens). Not tuned for quality.
  llama1b    The ~1B GPU benchmark shape: Llama-3.2-1B (16 layers, hidden 2048, 128k vocab, tied
             embeddings; 1.24B params), random init on the demo data and tokenizer unless
             --config.init_from=/path/to/Llama-3.2-1B. One H100/H200: seq_len 4096, 16 rows/step (65k
             tokens) in 2 microbatches, bf16 compute, full remat one unit per layer, loss in 1024-position
             chunks. 6 x 1.24e9 matmul params (tied head included) x 65k tokens + attention = ~4.9e14
             FLOP/step: ~1.0 s/step at 50% MFU (the target; not yet measured, no GPU lent so far).
  llama3_8b  Llama-3(.1)-8B from an HF directory (--config.init_from=/path/to/Meta-Llama-3-8B).
             8x H100/H200 or a TPU v5p-8: mesh fsdp=8, seq_len 4096, 64 rows/step in 4 microbatches,
             full remat one unit per layer, bf16 compute, loss in 1024-position chunks (unchunked,
             a 16 x 4096 microbatch's 128k-vocab fp32 logits are 33.6 GB, and as much again for
             their gradient). Estimate, not yet measured: 6 x 8.0e9 params x 262k tokens + attention
             = 1.3e16 FLOP/step; at 40% MFU on 8 x 989 TFLOP/s, ~4 s/step.
             Fit (launch/plan.py, compiled for the slice; docs/benchmarks.md): v5p-8 (fsdp=4) 60.6 of
             95 GiB per chip; v5e-16 only with --config.model.layers_per_unit=2 (15.9 of 16 GiB; as set,
             16.5); v5p-128 with --config.train.microbatches=1 (43.2 GiB with remat none).
  qwen2_7b   Qwen2/2.5-7B, same hardware and layout as llama3_8b: ~1.2e16 FLOP/step, ~3.8 s/step at
             40% MFU (estimate). Fit (launch/plan.py): v5p-8 57.5 of 95 GiB per chip, v5e-16 15.0 of
             16 GiB as set, v5p-128 with --config.train.microbatches=1.
  llama3_8b_qlora  Llama-3(.1)-8B with QLoRA on ONE device (--config.init_from=/path/to/Meta-Llama-3-8B):
             the projection kernels frozen in 4-bit NF4, rank-16 adapters (alpha 32, dropout 0.05) on all
             seven projections, bf16 compute, full remat, 8 microbatches of 2 x 2048 tokens, loss in
             512-position chunks. From shapes (launch/lora_memory.py): frozen base 6.0 GB (NF4 kernels +
             bf16 embeddings and head), adapters 0.17 GB (41.9M params) + their AdamW states 0.34 GB, vs
             96 GB of params + states for full fine-tuning; the activations of a 2 x 2048 microbatch under
             full remat add ~2-3 GB (estimate), so a 24 GB GPU (RTX 4090, L4, A10) or a 16 GB Colab TPU
             v5e-1 holds it. Checkpoints hold the adapters only (~0.5 GB); export merged or as a PEFT
             adapter (launch/export.py --lora adapter).
  qwen3_8b   Qwen3-8B from an HF directory (--config.init_from=/path/to/Qwen3-8B; 8.19B params, q/k norms).
             Same hardware and layout as llama3_8b: fp32 params + grads + AdamW states are 122 GiB in
             all, 15.3 GiB per chip over fsdp=8, the rest of 80 GB (H100) / 95 GB (v5p) for bf16
             activations of 16 x 4096-token microbatches under full remat. ~1.3e16 FLOP/step (estimate).
  gemma3_12b Gemma-3-12B's text model (11.8B params, 262k vocabulary, tied embeddings; 5 local : 1 global
             layers). init_from must be a Gemma3ForCausalLM directory (model_type gemma3_text): the hub's
             google/gemma-3-12b-it is the multimodal Gemma3ForConditionalGeneration, which align_jax
             refuses with that advice. 8x H100 or v5p-8, fsdp=8: 175 GiB of fp32 state, 21.9 GiB per
             chip; 8 microbatches of 8 x 4096 tokens and 512-position loss chunks (a 262k-vocab fp32
             logits chunk of 8 x 512 is 4.3 GB). Gemma's chat template has no system role: Gemma 3's
             folds a system message into the first user turn (Gemma 2's rejects it as a bad row).
  qwen3_30b_a3b  Qwen3-30B-A3B, the mixture of experts (30.5B params, 3.35B active: 128 experts, 8 per
             token). 16 chips (2 x 8 H100 or v5p-16): mesh fsdp=4 x expert=4, so each chip holds 1/16 of
             the experts; 455 GiB of fp32 state, 28.4 GiB per chip. The router's load-balancing loss
             (weight router_aux_loss_coef from config.json, 0.001) is logged as router_aux_loss.
             FLOPs follow the active parameters: ~6 x 3.35e9 x 262k tokens = 5.3e15 per step.
  long32k    Long-context SFT: Llama-3.1-8B (--config.init_from=/path/to/Llama-3.1-8B; its RoPE scaling
             covers 128k positions, Llama-3-8B's only 8k) on packed 32768-token rows with Ulysses sequence
             parallelism (docs/sequence_parallel.md). 8 devices (8x H100/H200 or a TPU v5p-16): mesh
             fsdp=-1 x sequence=4 (fsdp=2 there; a 4-chip v5p-8 gets fsdp=1); parameters, gradients and
             AdamW states are split over fsdp x sequence (128 GB in all, 16 GB per chip); each device runs
             8192 positions of a row outside attention and all 32768 for 8 of the 32 query heads (2 of 8 kv
             heads) inside it. 16 rows/step (524k tokens) in 4 microbatches, bf16 compute, full remat one
             unit per layer, loss in 1024-position chunks. Estimate, not yet measured: 6 x 8.0e9 params x
             524k tokens = 2.5e16 FLOP/step, plus attention, up to 1.4e16 more when rows are single 32k
             documents (less for packed shorter ones); ~12 s/step at 40% MFU on 8 x 989 TFLOP/s.
             Fit (launch/plan.py, splash attention inside Ulysses): v5p-16 (8 chips, fsdp=2 x sequence=4)
             48.5 of 95 GiB per chip; the planner's FLOP count is 3.7e16/step with attention.
  llama3_70b Llama-3(.1)-70B: 64 H100s or a TPU v5p-128: mesh fsdp=16 x tensor=4 (x data for the
             rest), seq_len 4096, 128 rows/step in 8 microbatches, remat one unit per 2 layers.
             Estimate: 6 x 70.6e9 params x 524k tokens + attention = 2.3e17 FLOP/step; ~9 s/step at
             40% MFU on 64 x 989 TFLOP/s. Fit (launch/plan.py): v5p-128 34.2 of 95 GiB per chip as set
             (4 microbatches with remat save_dots also fit, 74.5 GiB); not v5p-8 or v5e-16 (the train
             state alone is 197 / 49 GiB per chip there).

Data keys every stage shares: config.data.train / config.data.eval (a path, glob, `demo:NAME` or a
`datasets` name), config.data.format, config.train.steps, config.init_from.
"""

from align_jax.config import base_config


def get_config(arg: str = "tiny"):
    c = base_config("sft")
    c.data.train = "demo:sft_train"
    c.data.eval = "demo:sft_eval"
    if arg == "tiny":
        c.tokenizer = "demo"
        c.model.update(
            vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2
        )
        c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32
        c.model.scan_unroll = 4  # unrolled: no stacked per-layer residual buffers (faster on CPU)
        c.data.update(seq_len=256, batch_size=16)
        c.optim.update(lr=3e-3, warmup_steps=20, min_lr_ratio=0.05)
        c.train.update(steps=300, log_every=20, eval_every=100, ckpt_every=100)
        c.data.eval_batches = 8
    elif arg == "calculator_tiny":
        c.tokenizer = "demo"  # a BPE trained on the calculator chats: numbers stay single digits
        c.data.train = "demo:calculator_sft"
        c.data.eval = "demo:calculator_sft_eval"
        c.model.update(
            vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=2
        )
        c.model.dtype = "float32"
        c.model.scan_unroll = 4
        c.data.update(seq_len=256, batch_size=16)
        c.optim.update(lr=3e-3, warmup_steps=20, min_lr_ratio=0.05)
        # Copying the problem's numbers into the call digit for digit takes longer to learn than the demo
        # chats: 700 steps (on an earlier mix of these chats) left two calls in three with a digit wrong.
        c.train.update(steps=1000, log_every=20, eval_every=250, ckpt_every=250)
        c.data.eval_batches = 8
    elif arg == "small30m":
        c.tokenizer = "demo"
        c.model.update(
            vocab_size=512, hidden_size=512, intermediate_size=1408, num_layers=10, num_heads=8, num_kv_heads=4
        )
        c.model.dtype = "float32"
        c.data.update(seq_len=512, batch_size=8)
        c.optim.update(lr=1e-3, warmup_steps=20)
        c.train.update(steps=200, log_every=20, eval_every=100, ckpt_every=100)
        c.data.eval_batches = 4
    elif arg == "llama1b":
        c.tokenizer = "demo"
        c.model.update(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_layers=16,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            dtype="bfloat16",
            remat_policy="full",
            layers_per_unit=1,
        )
        c.data.update(seq_len=4096, batch_size=16)
        c.optim.update(lr=3e-4, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
        c.train.update(steps=1000, microbatches=2, loss_chunk=1024, log_every=10, eval_every=200, ckpt_every=200)
        c.data.eval_batches = 4
    elif arg in ("llama3_8b", "qwen2_7b", "qwen3_8b", "gemma3_12b", "qwen3_30b_a3b"):
        c.mesh.update(data=1, fsdp=-1)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.data.update(seq_len=4096, batch_size=64)
        c.optim.update(lr=1e-5, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
        c.train.update(steps=2000, microbatches=4, loss_chunk=1024, log_every=10, eval_every=200, ckpt_every=200)
        c.data.eval_batches = 20
        if arg == "gemma3_12b":  # 262k vocabulary: smaller loss chunks keep the logits chunk at 1 GB
            c.train.update(loss_chunk=512, microbatches=8)
        if arg == "qwen3_30b_a3b":  # experts on `expert` x fsdp: each chip holds 1/16 of every expert
            c.mesh.update(data=-1, fsdp=4, expert=4)
    elif arg == "llama3_8b_qlora":
        # One device: whatever the host has (a 24 GB GPU, a Colab TPU); no mesh axes to split.
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.lora.update(rank=16, alpha=32.0, dropout=0.05, targets="all", quantize="nf4")
        c.data.update(seq_len=2048, batch_size=16)
        c.optim.update(lr=2e-4, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.0)
        c.train.update(steps=1000, microbatches=8, loss_chunk=512, log_every=10, eval_every=200, ckpt_every=100)
        c.data.eval_batches = 10
    elif arg == "long32k":
        # Sequence parallelism: the `sequence` axis splits each row's positions, and the default rules
        # split the params over it as over fsdp (align_jax/sharding.py). 32 heads and 8 kv heads divide 4.
        c.mesh.update(data=1, fsdp=-1, sequence=4)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.data.update(seq_len=32768, batch_size=16)
        c.optim.update(lr=1e-5, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1)
        c.train.update(steps=1000, microbatches=4, loss_chunk=1024, log_every=10, eval_every=200, ckpt_every=100)
        c.data.eval_batches = 10
    elif arg == "llama3_70b":
        c.mesh.update(data=-1, fsdp=16, tensor=4)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=2)
        c.data.update(seq_len=4096, batch_size=128)
        c.optim.update(lr=5e-6, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1)
        c.train.update(steps=2000, microbatches=8, loss_chunk=1024, log_every=10, eval_every=200, ckpt_every=100)
        c.data.eval_batches = 20
    else:
        raise ValueError(
            f"configs/sft.py: unknown preset {arg!r}; presets: tiny, calculator_tiny, small30m, llama1b, llama3_8b, "
            "llama3_8b_qlora, qwen2_7b, qwen3_8b, gemma3_12b, qwen3_30b_a3b, long32k, llama3_70b"
        )
    c.lock()
    return c
