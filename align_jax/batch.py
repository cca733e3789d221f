"""The batches train steps take: every field of every stage's batch, declared once.

A batch is a dict of arrays with a fixed shape per run and the global batch as leading axis. B is the
batch (rows), T the row length (data.seq_len), P the most pairs packed into a row (data.max_pairs), K the
reference's top-k (kl_topk of a grpo config). A stage's `BatchSpec` names its fields; the driver shards each one
(batch over the data axes, length over `sequence`), and the loss reads nothing else.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import NamedSharding

from align_jax.sharding import Sharder, batch_sharding


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    shape: str  # axis letters, e.g. "B T"
    doc: str

    @property
    def ndim(self) -> int:
        return len(self.shape.split())


def _fields(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


# Packed token rows (SFT, and the prefix of every other batch). Attention never crosses a segment.
TOKEN_FIELDS = _fields(
    Field("tokens", "int32", "B T", "token ids; 0 after the last segment"),
    Field("positions", "int32", "B T", "position in its own segment (restarts at 0 in each)"),
    Field("segment_ids", "int32", "B T", "1, 2, ... per packed sequence; 0 = padding"),
    Field("loss_mask", "int32", "B T", "1 where the token is a target (its prediction counts)"),
)

# Packed preference pairs (rm, dpo): pair k of a row is segments 2k+1 (chosen) and 2k+2 (rejected).
PAIR_FIELDS = _fields(
    Field("pair_mask", "int32", "B P", "1 where pair k exists"),
    Field("example_id", "int32", "B P", "the pair's source row, -1 where none"),
    Field("chosen_score", "float32", "B P", "z-normalised absolute score of the chosen response, 0 where none"),
    Field("rejected_score", "float32", "B P", "same for the rejected response"),
    Field("score_mask", "int32", "B P", "1 where the pair has absolute scores"),
    Field("kto_label", "int32", "B P", "unpaired data: 1 desirable / 0 undesirable (0 for paired data)"),
)
REFERENCE_LOGPS = _fields(
    Field(
        "ref_logps",
        "float32",
        "B 2P",
        "precomputed reference log-prob sums of each response (a dpo config's reference = precomputed)",
    )
)

# One rollout (grpo): sampled responses as one segment per row, scored before the update.
ROLLOUT_FIELDS = _fields(
    Field(
        "old_logp",
        "float32",
        "B T",
        "log-prob of token t+1 at position t, teacher-forced under the trainer's params when the rollout was scored "
        "(last 0): the ratio's denominator",
    ),
    Field(
        "sampler_logp",
        "float32",
        "B T",
        "same token's log-prob as the sampler computed it while drawing it, under whatever params sampled (0 off "
        "the completion): the behaviour policy, for the mismatch metrics and truncated importance sampling",
    ),
    Field("ref_logp", "float32", "B T", "same under the frozen reference"),
    Field("advantages", "float32", "B T", "per-token advantage (GRPO: group-normalised score - KL to come)"),
)
PPO_FIELDS = _fields(
    Field("returns", "float32", "B T", "GAE returns, the value model's targets"),
    Field("old_values", "float32", "B T", "the value model's values at sampling time (value clipping)"),
)
# PTX: a packed SFT batch beside the rollout; with ptx_kind = "kl", the reference's top-k at its positions.
PTX_FIELDS = _fields(*(dataclasses.replace(f, name=f"ptx_{f.name}") for f in TOKEN_FIELDS.values()))
PTX_KL_FIELDS = _fields(
    Field("ptx_ref_values", "float32", "B T-1 K", "the reference's top-k logits at each SFT position"),
    Field("ptx_ref_indices", "int32", "B T-1 K", "their token ids"),
)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The fields one stage's train step takes."""

    fields: dict[str, Field]

    @classmethod
    def of(cls, *groups: dict[str, Field]) -> BatchSpec:
        out: dict[str, Field] = {}
        for group in groups:
            out.update(group)
        return cls(out)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.fields)

    def shardings(self, sharder: Sharder) -> dict[str, NamedSharding]:
        return {name: batch_sharding(sharder, f.ndim) for name, f in self.fields.items()}

    def describe(self) -> str:
        return "\n".join(f"{f.name:16s} {f.dtype:8s} [{f.shape}]  {f.doc}" for f in self.fields.values())


SFT_BATCH = BatchSpec.of(TOKEN_FIELDS)
PAIR_BATCH = BatchSpec.of(TOKEN_FIELDS, PAIR_FIELDS)
