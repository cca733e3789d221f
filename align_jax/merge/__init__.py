"""Model merging (the Baichuan report's step between SFT and RL, or after it): linear, task arithmetic,
TIES, DARE, SLERP and Model Stock, per tensor (`merge_tensors`), over in-memory param trees
(`merge_trees`), and over whole checkpoints on disk into a new workdir (`merge_checkpoints`).

    from align_jax.merge import merge_checkpoints
    merge_checkpoints("model_stock", ["runs/dpo", "runs/grpo"], "runs/merged", base="runs/sft")

methods.py holds the arithmetic, sources.py reads workdirs and HF directories leaf by leaf, and
checkpoints.py writes the merged workdir.
"""

from align_jax.merge.checkpoints import merge_checkpoints
from align_jax.merge.methods import METHOD_KWARGS, METHODS, NEEDS_BASE, merge_tensors, merge_trees

__all__ = ["METHODS", "METHOD_KWARGS", "NEEDS_BASE", "merge_checkpoints", "merge_tensors", "merge_trees"]
