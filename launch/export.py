"""Writes a stage workdir's final weights as a Hugging Face directory (safetensors + config.json +
tokenizer files), loadable by transformers.

    python launch/export.py --workdir W --out DIR [--dtype bfloat16] [--step N] [--overwrite]

DIR must be new or empty, and apart from the workdir (not it, inside it, or holding it); --overwrite
replaces a previous export there and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export(
    workdir: str, out: str, dtype: str | None = None, step: int | None = None, *, overwrite: bool = False
) -> str:
    from align_jax.models.hf import check_export_target
    from align_jax.outdir import check_apart

    # Both checks come before reading the checkpoint: a refused target costs nothing.
    check_apart(out, [("workdir", workdir)], kind="export", suffix="-hf")
    check_export_target(out, overwrite)

    from flax import linen as nn
    from transformers import AutoTokenizer

    from align_jax import checkpoint
    from align_jax.models.hf import abstract_params, save_pretrained
    from align_jax.models.hf_config import from_hf_dict
    from align_jax.workdir import TOKENIZER_DIR

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
    return save_pretrained(cfg, params, out, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="a new or empty directory, apart from --workdir")
    p.add_argument("--dtype", default=None, help="dtype of the written tensors (default: the params' dtype)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out if it holds a previous export (and nothing else)"
    )
    p.add_argument("--verbose", action="store_true", help="library logs at INFO")
    a = p.parse_args()
    from align_jax import cli

    cli.setup(a.verbose)
    try:
        out = export(a.workdir, a.out, a.dtype, a.step, overwrite=a.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
