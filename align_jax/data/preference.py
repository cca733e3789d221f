"""Preference data: chosen/rejected pairs (DPO family, reward models) and unpaired KTO rows -> packed batches.

Row formats and canonical records: preference_formats.py.

Batches (PREF_BATCH_FIELDS; numpy, leading dim b = batch_size / process_count, T = seq_len, P = max_pairs):
  tokens, positions, segment_ids, loss_mask  int32 [b,T]  as in SFT packing; loss_mask marks each response
                                             (+ its end-of-turn token), never the prompt
  pair k of a row is segments 2k+1 (chosen) and 2k+2 (rejected), adjacent, both starting with the same prompt tokens
  pair_mask int32 [b,P]  1 where pair k exists;  example_id int32 [b,P]  its source row index, -1 where none
  chosen_score, rejected_score float32 [b,P]  z-normalised scores, 0 where none;  score_mask int32 [b,P]
  kto_label int32 [b,P]  unpaired data: 1 desirable / 0 undesirable (0 for paired data)
Unpaired data (kto rows, or paired rows with unpaired=True, where each pair gives a desirable chosen and an
undesirable rejected unit, as TRL's unpair_preference_dataset): segment 2k+1 is prompt + completion, segment
2k+2 the same prompt + the completion of the next valid row after this one (cyclically; the same kind for
converted pairs), TRL's KL baseline sample, with its completion in loss_mask too. The partner depends on the
row index only, never on the shuffle. Converted pairs give two units with one example_id; (example_id,
kto_label) tells them apart.

Score normalisation: z = (score - mean) / std, with the mean and (population) std of every chosen and rejected
score of the valid rows of the train split, from one pass over it when the loader is made (std 1 when there are
fewer than two distinct scores). `compute_score_stats` gives them; pass them as `score_stats` to the eval loader
and to `iterate_all` (which default to the train split's) so every split uses the same scale.

Packing: a pair is one item of length len(chosen) + len(rejected) for the exact-fill packer, at most P per row.
An over-long pair is dropped (over_long="drop") or its responses are cut from the right, the longer first, to
fit (over_long="truncate"; a pair whose prompt alone leaves no room is dropped). A pair with a member left
without a target is dropped. The `examples` stat counts the pairs (units) placed. On the demo pairs
(demo:pref_train, the demo's 512-token BPE) that fills 99.4 / 99.7 / 99.7% of the slots at seq_len 256 / 384 /
512 under ChatML, and 97.1 / 99.3 / 99.5% under the Llama 3 template, whose longer headers put nearly a fifth
of the pairs past half of a 256-token row (no two of those can share one).

Loaders (pipeline.py's machinery): `make_preference_iterator(cfg, tokenizer, "train")` is endless, shuffled,
host-sharded and resumable like SFTIterator; "eval" gives one ordered pass, the same length on every host;
`iterate_all` (or split "all_train" / "all_eval") streams one ordered pass over a whole split, every pair once.
Each loader's `score_stats()` is the normalisation it uses, as a dict that `score_stats=` accepts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from align_jax import batch as batch_fields
from align_jax.data.formats import BadRowError, Message, Origin
from align_jax.data.multihost import sharded_stream
from align_jax.data.packing import FIELDS, OVER_LONG, PackingStats, Row, assign_rows, empty_rows, layout_row
from align_jax.data.pipeline import (
    ON_BAD_ROW,
    BadRows,
    Batch,
    DataConfigMixin,
    OrderedBatches,
    ShardedBatches,
    ShuffledBatches,
    add_packing_stats,
)
from align_jax.data.preference_formats import (
    PREF_FORMATS,
    Record,
    to_preference_record,
)
from align_jax.data.sources import RowSource, open_source
from align_jax.data.tokenize import TemplateError, TemplateRejected, end_of_turn_ids, tokenize_chat
from align_jax.workdir import resolve_data_path

PAIR_FIELDS = tuple(batch_fields.PAIR_FIELDS)  # declared, with their meaning, in align_jax/batch.py
PREF_BATCH_FIELDS = (*FIELDS, *PAIR_FIELDS)
# Bumped whenever what a window of rows becomes changes (saved positions are only exact under the same).
PREFERENCE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ScoreStats:
    """Mean and std that z-normalise the absolute scores; `count` is how many scores they come from."""

    mean: float = 0.0
    std: float = 1.0
    count: int = 0


def _valid_records(source: RowSource, fmt: str, chunk: int = 1024):
    """Every record that parses, in order; bad rows are passed over silently (the loaders report them)."""
    for lo in range(0, len(source), chunk):
        for raw, origin in source.read(list(range(lo, min(lo + chunk, len(source))))):
            try:
                if not isinstance(raw, BadRowError):
                    yield to_preference_record(raw, fmt, origin)
            except BadRowError:
                continue


def _score_stats(source: RowSource, fmt: str) -> ScoreStats:
    pairs = [
        (r["chosen_score"], r["rejected_score"])
        for r in _valid_records(source, fmt)
        if r.get("chosen_score") is not None
    ]
    scores = [s for pair in pairs for s in pair]
    if not scores:
        return ScoreStats()
    std = float(np.std(scores))
    return ScoreStats(float(np.mean(scores)), std if std > 0 else 1.0, len(scores))


def _resolve(spec: Any) -> Any:
    """`demo:NAME` (see config.resolve_data_path) in a spec or a list of specs; anything else as given."""
    if isinstance(spec, str):
        return resolve_data_path(spec)
    if isinstance(spec, list | tuple):
        return [resolve_data_path(s) if isinstance(s, str) else s for s in spec]
    return spec


def compute_score_stats(data_cfg: Any, split: str = "train") -> ScoreStats:
    """The score normalisation of `split` (one pass over its rows, no tokenising)."""
    cfg = PreferenceDataConfig.from_any(data_cfg)
    return _score_stats(open_source(_resolve(getattr(cfg, split)), "train" if split == "train" else None), cfg.format)


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig(DataConfigMixin):
    """What the preference pipeline reads. `batch_size` is global, in packed rows of `seq_len` tokens; each
    row holds at most `max_pairs` pairs (0: seq_len // 32); `pack_window` counts source rows."""

    train: Any = None  # a source spec (see sources.open_source), or "demo:NAME"
    eval: Any = None
    format: str = "auto"
    seq_len: int = 1024
    batch_size: int = 8
    max_pairs: int = 0
    unpaired: bool = False
    over_long: str = "truncate"
    on_bad_row: str = "error"
    shuffle_seed: int = 0
    pack_window: int = 1000

    def __post_init__(self) -> None:
        self._check(
            {"format": PREF_FORMATS, "over_long": OVER_LONG, "on_bad_row": ON_BAD_ROW},
            {"seq_len": 4, "batch_size": 1, "max_pairs": 0, "pack_window": 1, "shuffle_seed": 0},
        )
        if not isinstance(self.unpaired, bool | np.bool_):
            raise ValueError(f"data.unpaired={self.unpaired!r}; expected true or false")

    @property
    def pairs_per_row(self) -> int:
        return self.max_pairs or max(1, self.seq_len // 32)


Unit = tuple  # (ids_a, mask_a, ids_b, mask_b, prompt_len, (example_id, chosen_z, rejected_z, scored, label))


class _Pairs:
    """A window of row indices -> packed pair rows (a pipeline.WindowPacker)."""

    def __init__(self, source: RowSource, tokenizer: Any, cfg: PreferenceDataConfig, scores: ScoreStats, kto: bool):
        self.source, self.tokenizer, self.cfg, self.scores, self.kto = source, tokenizer, cfg, scores, kto
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.bad_rows = BadRows(cfg.on_bad_row)

    def settings(self) -> dict[str, Any]:
        s = self.scores
        extra = {"score_mean": s.mean, "score_std": s.std, "preference": PREFERENCE_VERSION}
        return {"max_pairs": self.cfg.pairs_per_row, "unpaired": self.cfg.unpaired, "kto": self.kto, **extra}

    def _no_pairs(self, *shape: int) -> dict[str, np.ndarray]:
        out = {
            k: np.zeros((*shape, self.cfg.pairs_per_row), np.float32 if k.endswith("_score") else np.int32)
            for k in PAIR_FIELDS
        }
        out["example_id"][:] = -1
        return out

    def empty(self, n: int) -> Batch:
        return {**empty_rows(n, self.cfg.seq_len), **self._no_pairs(n)}

    def _parse(self, raw: Any, origin: Origin, stats: dict[str, int] | None) -> Record | None:
        try:
            if isinstance(raw, BadRowError):
                raise raw
            record = to_preference_record(raw, self.cfg.format, origin)
            if "label" in record and not self.kto:
                raise BadRowError(origin, "label", "an unpaired (KTO) row in paired preference data")
            if "label" not in record and self.kto and not self.cfg.unpaired:
                raise BadRowError(origin, None, "a paired row in unpaired (KTO) data; set unpaired=True to split pairs")
            return record
        except BadRowError as e:
            self.bad_rows.handle(e, stats)
            return None

    def _partners(self, rows: Sequence[int]) -> dict[int, Record]:
        """Row i -> the record of the next valid row after i (cyclically; i itself at worst)."""
        n, found, cache = len(self.source), {}, {}
        pending = {i: (i + 1) % n for i in rows}
        while pending:
            need = sorted({j for j in pending.values() if j not in cache})
            for j, (raw, origin) in zip(need, self.source.read(need), strict=True):
                cache[j] = self._parse(raw, origin, None)  # counted when read as its own row
            found.update({i: cache[j] for i, j in pending.items() if cache[j] is not None})
            pending = {i: (j + 1) % n for i, j in pending.items() if cache[j] is None}
        return found

    def _tokenize(self, prompt: list, a: list, b: list) -> tuple:
        ia, ma = tokenize_chat(self.tokenizer, prompt + a, "last_assistant", self.eot_ids)
        ib, mb = tokenize_chat(self.tokenizer, prompt + b, "last_assistant", self.eot_ids)
        p = int(np.argmax(ma)) if ma.any() else len(ia)
        if p != (int(np.argmax(mb)) if mb.any() else len(ib)) or not np.array_equal(ia[:p], ib[:p]):
            raise TemplateError("the two sequences of a pair do not start with the same prompt tokens")
        return ia, ma, ib, mb, p

    def _units(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Unit]:
        read = zip(indices, self.source.read(indices), strict=True)
        records = [(i, rec, origin) for i, (raw, origin) in read if (rec := self._parse(raw, origin, stats))]
        partners = self._partners([i for i, _, _ in records]) if self.kto else {}
        z = self.scores
        units = []
        for i, rec, origin in records:
            mine = []  # this row's units: all of them or, if the template refuses the row, none
            try:
                if not self.kto:
                    scored = rec["chosen_score"] is not None
                    cz = (rec["chosen_score"] - z.mean) / z.std if scored else 0.0
                    rz = (rec["rejected_score"] - z.mean) / z.std if scored else 0.0
                    mine.append(
                        (*self._tokenize(rec["prompt"], rec["chosen"], rec["rejected"]), (i, cz, rz, scored, 0))
                    )
                else:
                    theirs = _completions(partners[i])
                    for k, (completion, label) in enumerate(_completions(rec)):
                        kl = theirs[k % len(theirs)][0]
                        mine.append((*self._tokenize(rec["prompt"], completion, kl), (i, 0.0, 0.0, False, label)))
            except TemplateRejected as e:
                # The template's own refusal (Gemma 2 and a system message) is a bad row, like the SFT loader's.
                self.bad_rows.handle(BadRowError(origin, "prompt", str(e)), stats)
                continue
            except TemplateError as e:
                raise TemplateError(f"{origin}: {e}") from e
            units += mine
        return units

    def _fit(self, unit: Unit, stats: PackingStats) -> Unit | None:
        ia, ma, ib, mb, p, meta = unit
        seq_len = self.cfg.seq_len
        if len(ia) + len(ib) > seq_len:
            if self.cfg.over_long == "drop" or 2 * (p + 1) > seq_len:
                stats.dropped += 1
                return None
            # Cut the longer response first: each keeps at least half the room the prompts leave.
            room = seq_len - 2 * p
            ka = min(len(ia) - p, max(room // 2, room - (len(ib) - p)))
            kb = min(len(ib) - p, room - ka)
            ia, ma, ib, mb = ia[: p + ka], ma[: p + ka], ib[: p + kb], mb[: p + kb]
            stats.truncated += 1
        if not (ma[1:].any() and mb[1:].any()):
            stats.no_target += 1
            return None
        return ia, ma, ib, mb, p, meta

    def pack(self, indices: Sequence[int], stats: dict[str, int] | None) -> list[Row]:
        pstats = PackingStats()
        units = [u for u in (self._fit(u, pstats) for u in self._units(indices, stats)) if u is not None]
        seq_len, max_pairs = self.cfg.seq_len, self.cfg.pairs_per_row
        rows = []
        for members in assign_rows([len(u[0]) + len(u[2]) for u in units], seq_len, max_pairs):
            row = layout_row(
                [s for k in members for s in ((units[k][0], units[k][1]), (units[k][2], units[k][3]))], seq_len
            )
            row.update(self._no_pairs())
            for slot, k in enumerate(members):
                example_id, cz, rz, scored, label = units[k][5]
                row["pair_mask"][slot], row["example_id"][slot], row["kto_label"][slot] = 1, example_id, int(label)
                row["chosen_score"][slot], row["rejected_score"][slot], row["score_mask"][slot] = cz, rz, int(scored)
            rows.append(row)
        pstats.examples, pstats.rows, pstats.slots = len(units), len(rows), len(rows) * seq_len
        pstats.real_tokens = sum(len(u[0]) + len(u[2]) for u in units)
        add_packing_stats(stats, pstats)
        return rows


def _completions(record: Record) -> list[tuple[list[Message], bool]]:
    if "label" in record:
        return [(record["completion"], record["label"])]
    return [(record["chosen"], True), (record["rejected"], False)]


class _Described:
    """What both preference loaders tell about the data they read."""

    _examples: _Pairs

    def score_stats(self) -> dict[str, float]:
        """The score normalisation in use, {"mean", "std", "count"}: JSON-able, and what `score_stats=` takes."""
        return dataclasses.asdict(self._examples.scores)

    @property
    def unpaired_output(self) -> bool:
        """Whether pairs are unpaired (KTO) units: (completion, KL sample) with kto_label."""
        return self._examples.kto

    @property
    def num_rows(self) -> int:
        """Rows in the split's source: every example_id is below it."""
        return len(self._examples.source)


class PreferenceIterator(_Described, ShuffledBatches):
    """The preference train loader: endless, shuffled, host-sharded, resumable (state/restore/stats as
    SFTIterator), yielding PREF_BATCH_FIELDS."""

    def __init__(self, windows: _Pairs, process_index: int, process_count: int):
        super().__init__(windows, windows.cfg, process_index, process_count)


class PreferenceBatches(_Described, OrderedBatches):
    """One ordered pass over a split (eval, or `iterate_all`): every pair once, the same len() on every host,
    the last global batch padded with empty rows (pair_mask 0, example_id -1)."""

    def __init__(self, windows: _Pairs, process_index: int, process_count: int, cache: bool = True):
        super().__init__(windows, windows.cfg, process_index, process_count, cache)


def _first_kind(source: RowSource, fmt: str) -> str | None:
    for record in _valid_records(source, fmt, chunk=64):
        return "kto" if "label" in record else "paired"
    return None


def _windows(
    data_cfg: Any, tokenizer: Any, split: str, process_index: int | None, process_count: int | None, score_stats: Any
) -> tuple[_Pairs, int, int]:
    cfg = PreferenceDataConfig.from_any(data_cfg)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}; expected 'train' or 'eval'")
    spec = getattr(cfg, split)
    if spec is None or spec == "":
        raise ValueError(f"data.{split} is not set: give a file, glob, dataset name, tfds:NAME/SPLIT or demo:NAME")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} out of range for process_count={process_count}")
    source = open_source(_resolve(spec), split="train" if split == "train" else None)
    # The train split sets the scale of the scores and whether the data is paired, for every split.
    train = source if split == "train" or not cfg.train else None
    if score_stats is None:
        train = train or open_source(_resolve(cfg.train), split="train")
        score_stats = _score_stats(train, cfg.format)
    elif isinstance(score_stats, Mapping):
        score_stats = ScoreStats(**score_stats)
    kto = cfg.unpaired or cfg.format == "kto"
    if cfg.format == "auto" and not kto:
        train = train or open_source(_resolve(cfg.train), split="train")
        kto = (_first_kind(train, cfg.format) or _first_kind(source, cfg.format)) == "kto"
    return _Pairs(source, tokenizer, cfg, score_stats, kto), process_index, process_count


def make_preference_iterator(
    data_cfg: Any,
    tokenizer: Any,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    score_stats: ScoreStats | Mapping[str, float] | None = None,
) -> PreferenceIterator | ShardedBatches | PreferenceBatches:
    """The loader for `split`: "train", the endless `PreferenceIterator`; "eval", the finite `PreferenceBatches`,
    packed once and kept; "all_train" / "all_eval", `iterate_all` of that split. `score_stats` (a ScoreStats or
    its dict, as `score_stats()` returns) defaults to the train split's (module doc)."""
    if split in ("all_train", "all_eval"):
        return iterate_all(data_cfg, tokenizer, split[4:], process_index, process_count, score_stats)
    windows, index, count = _windows(data_cfg, tokenizer, split, process_index, process_count, score_stats)
    if split == "eval":
        return PreferenceBatches(windows, index, count)
    return sharded_stream(lambda s, k: PreferenceIterator(windows, s, k), index, count)  # multihost.py: data shards


def iterate_all(
    data_cfg: Any,
    tokenizer: Any,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    score_stats: ScoreStats | Mapping[str, float] | None = None,
) -> PreferenceBatches:
    """One ordered pass over a whole split in fixed-shape batches, every pair exactly once (e.g. to compute the
    reference log-probs of every example_id). Streams window by window: nothing is kept between passes."""
    windows, index, count = _windows(data_cfg, tokenizer, split, process_index, process_count, score_stats)
    return PreferenceBatches(windows, index, count, cache=False)
