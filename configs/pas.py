"""PAS: the report's Prompt Augmentation System — curated prompts, judged complements, a small PAS model.

    python launch/train.py --config configs/pas.py:<preset> --workdir DIR --config.init_from=MODEL

Curates config.prompts (embedding near-duplicate removal, k-means diversity selection, optional
quality scores, category tags and caps), has a teacher write a complementary prompt for each (a judge
marks each valid or invalid with a reason; invalid ones are regenerated), and trains the PAS model on
(prompt -> complement) from init_from with the SFT stage's code (align_jax/stages/pas.py). Then
`python launch/augment.py --pas DIR --prompt "..."` appends its complement to a prompt, and the grpo
stage and the pipeline's evaluation can do the same (`grpo.augment`, `eval.pas`).

Presets:
  tiny       The CPU demo, after configs/sft.py:tiny (--config.init_from=runs/sft-demo): the first user
             turns of the demo chats, hashed n-gram embeddings, the demo's template tagger, and the
             template teacher with a rule judge: the offline stand-in for a teacher LLM, which writes
             deliberately flawed drafts 15% of the time so the judge/regenerate loop runs. 2-core CPU:
             ~10 s of curation and complements, then ~1 min of training (150 steps).
  llama3_8b  A PAS model from an 8B SFT workdir or HF directory, with a teacher and judge LLM
             (--config.teacher=/models/TEACHER --config.judge=/models/TEACHER) and your prompts
             (--config.prompts=prompts.jsonl); the report's PAS model is small, so this is the upper
             end. 8x H100/H200: complements dominate (teacher decode), training is a short SFT run.
"""

from align_jax.config import base_config


def get_config(arg: str = "tiny"):
    c = base_config("pas")
    c.data.eval = ""  # the stage holds out config.eval_fraction of the complements itself
    if arg == "tiny":
        c.update(prompts="demo:sft_train", embedder="hashed", dedup_threshold=0.9, n_clusters="128")
        c.update(per_cluster=20, tagger="demo", balance_cap=500, teacher="template", judge="rule", max_new_tokens=48)
        c.model.dtype = "float32"
        c.model.scan_unroll = 4
        c.data.update(seq_len=256, batch_size=16, eval_batches=4)
        c.optim.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
        c.train.update(steps=150, log_every=10, eval_every=50, ckpt_every=50)
    elif arg == "llama3_8b":
        # Replace the demo prompts and the template teacher/judge on the command line (see above).
        c.update(prompts="demo:sft_train", embedder="hashed", n_clusters="64,16", per_cluster=20)
        c.update(tagger="centroid", balance_cap=2000, teacher="template", judge="rule", max_new_tokens=96)
        c.mesh.update(data=1, fsdp=-1)
        c.model.update(dtype="bfloat16", remat_policy="full", layers_per_unit=1)
        c.data.update(seq_len=1024, batch_size=64)
        c.optim.update(lr=1e-5, warmup_steps=20)
        c.train.update(steps=300, log_every=10, eval_every=100, ckpt_every=100)
    else:
        raise ValueError(f"configs/pas.py: unknown preset {arg!r}; presets: tiny, llama3_8b")
    c.lock()
    return c
