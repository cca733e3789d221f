"""Writes a stage workdir's final weights as a Hugging Face directory (safetensors + config.json +
tokenizer files), loadable by transformers.

    python launch/export.py --workdir W --out DIR [--dtype bfloat16] [--step N]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export(workdir: str, out: str, dtype: str | None = None, step: int | None = None) -> str:
    from flax import linen as nn
    from transformers import AutoTokenizer

    from align_jax import checkpoint
    from align_jax.models.config import from_hf_dict
    from align_jax.models.hf import abstract_params, save_pretrained
    from align_jax.stages.build import TOKENIZER_DIR

    saved = checkpoint.read_config(workdir, step)
    if saved.get("config", {}).get("stage") == "rm":
        raise ValueError(
            f"{workdir} holds a reward model (decoder + scalar head, read at each response's last target "
            "token); export writes causal LMs. Score with launch/score.py or align_jax.eval.reward.RewardScorer"
        )
    cfg = from_hf_dict(saved["hf_model_config"], where=f"{workdir} (saved config)", **saved.get("runtime", {}))
    abstract = nn.meta.unbox(abstract_params(cfg))
    params = checkpoint.restore_decoder_params(workdir, abstract, step)
    tok_dir = os.path.join(workdir, TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if os.path.isdir(tok_dir) else None
    return save_pretrained(cfg, params, out, tokenizer=tokenizer, dtype=dtype)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="dtype of the written tensors (default: the params' dtype)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    a = p.parse_args()
    print(export(a.workdir, a.out, a.dtype, a.step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
