"""Scores responses with a trained reward model (an rm stage workdir).

    python launch/score.py --workdir RM_WORKDIR --input rows.jsonl [--output scored.jsonl] [--step N]
    python launch/score.py --workdir RM_WORKDIR --prompt "What is 2 plus 3?" --response "2 plus 3 is 5."

Input rows are either preference rows in any format the rm stage reads (HH-RLHF, prompt/chosen/
rejected strings or message lists, ...), scored as `chosen_reward` and `rejected_reward`, or
`{"prompt": str | messages, "response": str}` rows, scored as `reward`. Each output row is the input
row plus its rewards. The last line printed is a JSON summary (rows, pairs, pairwise accuracy).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from align_jax.host import tune_host_allocator

_WORKDIR = flags.DEFINE_string("workdir", None, "the rm stage's workdir")
_INPUT = flags.DEFINE_string("input", None, "JSONL rows to score")
_OUTPUT = flags.DEFINE_string("output", None, "where to write the scored rows (JSONL); default: stdout")
_PROMPT = flags.DEFINE_string("prompt", None, "score one prompt ...")
_RESPONSE = flags.DEFINE_string("response", None, "... and response")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_BATCH = flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
_VERBOSE = flags.DEFINE_bool("verbose", False, "library logs at INFO, and tracebacks for input errors")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> int:
    tune_host_allocator()  # before JAX starts its CPU backend: see align_jax/host.py
    del argv
    from align_jax import cli

    verbose = cli.setup(_VERBOSE.value)
    with cli.user_errors(verbose):
        from align_jax.data.formats import BadRowError, Origin
        from align_jax.data.preference import to_preference_record
        from align_jax.eval.reward import RewardScorer

        scorer = RewardScorer.load(_WORKDIR.value, step=_STEP.value, batch_size=_BATCH.value)
        if _PROMPT.value is not None:
            if _RESPONSE.value is None:
                raise SystemExit("--prompt needs --response")
            print(json.dumps({"reward": float(scorer.score([_PROMPT.value], [_RESPONSE.value])[0])}))
            return 0
        if not _INPUT.value:
            raise SystemExit("give --input rows.jsonl, or --prompt and --response")

        rows, singles, pairs = [], [], []
        with open(_INPUT.value) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                rows.append(row)
                if "response" in row:
                    singles.append((len(rows) - 1, row["prompt"], row["response"]))
                    continue
                try:
                    rec = to_preference_record(row, origin=Origin(_INPUT.value, line_no, "line"))
                except BadRowError as e:
                    raise SystemExit(f"score: {e}") from None
                if "chosen" not in rec:
                    raise SystemExit(f"{_INPUT.value} line {line_no}: not a pair and no 'response' field")
                pairs.append(
                    (len(rows) - 1, rec["prompt"], rec["chosen"][-1]["content"], rec["rejected"][-1]["content"])
                )

        if singles:
            rewards = scorer.score([p for _, p, _ in singles], [r for _, _, r in singles])
            for (i, _, _), r in zip(singles, rewards, strict=True):
                rows[i]["reward"] = float(r)
        correct = 0
        if pairs:
            prompts = [p for _, p, _, _ in pairs]
            rc = scorer.score(prompts, [c for _, _, c, _ in pairs])
            rr = scorer.score(prompts, [r for _, _, _, r in pairs])
            for (i, *_), a, b in zip(pairs, rc, rr, strict=True):
                rows[i]["chosen_reward"], rows[i]["rejected_reward"] = float(a), float(b)
            correct = int((rc > rr).sum())
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if _OUTPUT.value:
            with open(_OUTPUT.value, "w") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        summary = {"rows": len(rows), "pairs": len(pairs), "accuracy": correct / len(pairs) if pairs else None}
        print(json.dumps(summary))
        return 0


if __name__ == "__main__":
    from align_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
