"""Writes a stage workdir's final weights as a Hugging Face directory (safetensors + config.json +
tokenizer files), loadable by transformers.

    python launch/export.py --workdir W --out DIR [--dtype bfloat16] [--step N] [--overwrite]
                            [--lora merged|adapter]

A LoRA run (config.lora.rank > 0) exports `merged` by default: each adapted weight is W + (alpha / r) B A,
a plain HF directory of the base architecture (for QLoRA, W is the NF4-rounded base the adapters were
trained on). `--lora adapter` writes a PEFT adapter directory instead (adapter_config.json +
adapter_model.safetensors) for `peft.PeftModel.from_pretrained(base, DIR)` on the run's init_from.

DIR must be new or empty, and apart from the workdir (not it, inside it, or holding it); --overwrite
replaces a previous export (of the same kind) there and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export(
    workdir: str,
    out: str,
    dtype: str | None = None,
    step: int | None = None,
    *,
    overwrite: bool = False,
    lora: str = "merged",
) -> str:
    from align_jax.models.hf import check_export_target
    from align_jax.outdir import check_apart

    if lora not in ("merged", "adapter"):
        raise ValueError(f"--lora={lora!r}: merged (an HF directory) or adapter (a PEFT adapter directory)")
    # Both checks come before reading the checkpoint: a refused target costs nothing.
    check_apart(out, [("workdir", workdir)], kind="export", suffix="-hf")
    if lora == "adapter":
        from align_jax.lora.peft_dir import check_adapter_target, save_adapter

        check_adapter_target(out, overwrite)
        return save_adapter(workdir, out, step, dtype, overwrite=overwrite)
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
    params = checkpoint.restore_decoder_params(workdir, abstract, step)  # a LoRA run's: adapters merged
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
    p.add_argument(
        "--lora",
        default="merged",
        choices=("merged", "adapter"),
        help="a LoRA run: merged weights (an HF directory) or its adapters (a PEFT adapter directory)",
    )
    p.add_argument("--verbose", action="store_true", help="library logs at INFO")
    a = p.parse_args()
    from align_jax import cli

    cli.setup(a.verbose)
    try:
        out = export(a.workdir, a.out, a.dtype, a.step, overwrite=a.overwrite, lora=a.lora)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
