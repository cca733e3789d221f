"""Augments prompts with a trained PAS model: each prompt gets the model's complementary prompt appended.

    python launch/augment.py --pas PAS_WORKDIR --input prompts.jsonl --output augmented.jsonl
    python launch/augment.py --pas PAS_WORKDIR --prompt "What is 2 plus 3?"

Input rows have a "prompt": a string, or a list of {role, content} messages (its last user turn is
augmented). Each output row is the input row plus "complement" and "augmented_prompt" (same type as the
prompt); it is written atomically, or printed when no --output is given. The last line printed is a JSON
summary (rows, how many got a non-empty complement).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from align_jax.host import tune_host_allocator

_PAS = flags.DEFINE_string("pas", None, "the PAS model: an sft stage workdir or an HF directory")
_INPUT = flags.DEFINE_string("input", None, "JSONL rows with a 'prompt'")
_PROMPT = flags.DEFINE_string("prompt", None, "augment one prompt instead of a file")
_OUTPUT = flags.DEFINE_string("output", None, "where to write the augmented rows (JSONL); default: stdout")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "longest complement, in tokens")
_BATCH = flags.DEFINE_integer("batch_size", 16, "prompts per generation batch")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library logs at INFO, and tracebacks for input errors")
flags.mark_flags_as_required(["pas"])


def main(argv) -> int:
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    with cli.user_errors(verbose):
        from align_jax.pas.augment import Augmenter, augment_rows
        from align_jax.pas.jsonl import read_jsonl, write_jsonl

        if (_INPUT.value is None) == (_PROMPT.value is None):
            raise SystemExit("give exactly one of --input rows.jsonl and --prompt TEXT")
        try:
            rows = [{"prompt": _PROMPT.value}] if _PROMPT.value is not None else read_jsonl(_INPUT.value)
            aug = Augmenter.load(_PAS.value, step=_STEP.value, batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value)
            out = augment_rows(aug, rows, where=_INPUT.value or "--prompt")
        except (OSError, ValueError) as e:
            raise SystemExit(f"augment: {e}") from None
        if _OUTPUT.value:
            write_jsonl(_OUTPUT.value, out)
        else:
            sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        print(json.dumps({"rows": len(out), "complemented": sum(bool(r["complement"]) for r in out)}))
        return 0


if __name__ == "__main__":
    from align_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
