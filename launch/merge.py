"""Merges models (stage workdirs or Hugging Face directories) into a new align_jax workdir; prints the
summary as JSON.

    python launch/merge.py --method model_stock --base runs/sft --models runs/dpo,runs/grpo --out runs/merged
    python launch/merge.py --method slerp --models runs/a,runs/b --t 0.3 --out runs/ab [--hf_out runs/ab-hf]

Methods: linear, task_arithmetic, ties, dare_linear, dare_ties, slerp, model_stock (align_jax/merge).
Only the options a method takes may be given (e.g. --t for slerp, --density for ties).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# CLI flag -> merge option; a flag left unset takes the method's default.
OPTIONS = {"t": float, "density": float, "drop_rate": float, "scale": float, "seed": int}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: expected comma-separated numbers") from None


def main(argv: list[str] | None = None) -> int:
    from align_jax.merge import METHODS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--models", required=True, help="comma-separated workdirs / HF dirs to merge")
    p.add_argument("--base", default=None, help="the model the others were fine-tuned from (not for linear/slerp)")
    p.add_argument("--out", required=True, help="the merged workdir to write")
    p.add_argument("--weights", type=_floats, default=None, help="one weight per model, comma-separated")
    for name, kind in OPTIONS.items():
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--no_normalize", action="store_true", help="linear: use the weights as given, not summing to 1")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier merge in --out (and an earlier export in --hf_out); nothing else",
    )
    p.add_argument("--hf_out", default=None, help="also export the merged model as a Hugging Face directory")
    p.add_argument("--hf_dtype", default=None, help="dtype of the exported tensors (default: the params' dtype)")
    p.add_argument("--verbose", action="store_true", help="library logs at INFO, one line per merged tensor")
    a = p.parse_args(argv)
    from align_jax import cli

    cli.setup(a.verbose)
    if a.verbose:
        logging.getLogger("align_jax.merge").setLevel(logging.DEBUG)

    from align_jax.merge import merge_checkpoints

    kwargs = {name: getattr(a, name) for name in OPTIONS if getattr(a, name) is not None}
    if a.no_normalize:
        kwargs["normalize"] = False
    models = [m for m in a.models.split(",") if m.strip()]
    try:
        summary = merge_checkpoints(
            a.method, models, a.out, base=a.base, weights=a.weights, overwrite=a.overwrite, **kwargs
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        p.error(str(e))
    if a.hf_out:
        from export import export

        try:
            summary["hf_out"] = export(a.out, a.hf_out, dtype=a.hf_dtype, overwrite=a.overwrite)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            p.error(str(e))
    done = "already held this merge" if summary.get("skipped") else f"merged in {summary.get('seconds', 0):.1f} s"
    hf = f"; Hugging Face export: {summary['hf_out']}" if summary.get("hf_out") else ""
    print(f"{a.method} of {len(models)} model(s): {a.out} {done} (summary.json){hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
