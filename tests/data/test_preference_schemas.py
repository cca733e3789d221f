"""Preference rows in the exact schemas of public datasets, as `datasets` writes and reads them:
Anthropic/hh-rlhf, HuggingFaceH4/ultrafeedback_binarized and TRL's conversational and standard forms.
Detection and exact records, HH-RLHF's quirks, UltraFeedback's score ties, and the rm / dpo stages' own
loader (stages/pairs.py) reading them from a Parquet export, a save_to_disk directory and JSONL.

The hub is not reachable from the tests, so the fixtures below are written by hand in those schemas
(column names, types and nesting as the hub's Arrow features have them)."""

from __future__ import annotations

import logging
import re
import types

import datasets
import numpy as np
import pytest

from align_jax.data.formats import BadRowError, Origin, detect_format
from align_jax.data.preference import make_preference_iterator
from align_jax.data.preference_formats import detect_preference_format, to_preference_record
from align_jax.data.tokenize import tokenize_chat
from align_jax.stages.pairs import pair_data
from tests.test_configs import load_preset

datasets.disable_progress_bars()


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def uf_msg(role, text):
    return {"content": text, "role": role}  # the hub's key order


# -- fixtures in the exact schemas, each with the record it must become (checked by hand) ---------------


def record(prompt, good, worse, scores=(None, None)):
    return {
        "prompt": prompt,
        "chosen": [bot(good)],
        "rejected": [bot(worse)],
        "chosen_score": scores[0],
        "rejected_score": scores[1],
    }


HH_HEAD = "\n\nHuman: What is 17 plus 25?\n\nAssistant: 17 plus 25 is 42.\n\nHuman: Which is larger, 3 or 9?"
HH = [
    (  # two exchanges; the pair differs only in the last reply
        {"chosen": HH_HEAD + "\n\nAssistant: 9 is larger.", "rejected": HH_HEAD + "\n\nAssistant: 3 is larger."},
        record(
            [user("What is 17 plus 25?"), bot("17 plus 25 is 42."), user("Which is larger, 3 or 9?")],
            "9 is larger.",
            "3 is larger.",
        ),
    ),
    (  # leading blank lines and spaces that differ between the two transcripts
        {
            "chosen": "\n\nHuman: Reverse the word apple.\n\nAssistant: apple reversed is elppa.",
            "rejected": " Human: Reverse the word apple. \n\nAssistant:  elppa elppa\n",
        },
        record([user("Reverse the word apple.")], "apple reversed is elppa.", "elppa elppa"),
    ),
    (  # newlines inside a reply stay
        {
            "chosen": "\n\nHuman: List three colors.\n\nAssistant: 1. red\n2. blue\n3. green",
            "rejected": "\n\nHuman: List three colors.\n\nAssistant: red",
        },
        record([user("List three colors.")], "1. red\n2. blue\n3. green", "red"),
    ),
]


def uf_case(prompt_id, prompt, good, worse, score_chosen, score_rejected):
    """An ultrafeedback_binarized row (every column, nesting and key order as on the hub) and its record."""
    chosen = [uf_msg("user", prompt), uf_msg("assistant", good)]
    row = {
        "prompt": prompt,
        "prompt_id": prompt_id,
        "chosen": chosen,
        "rejected": [uf_msg("user", prompt), uf_msg("assistant", worse)],
        "messages": chosen,  # the SFT view of the same row
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }
    return row, record([user(prompt)], good, worse, (score_chosen, score_rejected))


UF = [
    uf_case("4e1f", "What is 17 plus 25?", "17 plus 25 is 42.", "It is 43.", 9.0, 2.0),
    uf_case("a07c", "Write hello in capital letters.", "HELLO", "Hello", 7.5, 7.5),  # a tie
    uf_case("9b2d", "List three colors.", "1. red\n2. blue\n3. green", "Red.", 8.0, 4.5),
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
HISTORY = [user("Hello there, how are you today?"), bot("Hello."), user("Reverse the word apple.")]
TRL_CONVERSATIONAL = [
    (
        {"prompt": [SYSTEM, user("What is 17 plus 25?")], "chosen": [bot("42.")], "rejected": [bot("43.")]},
        record([SYSTEM, user("What is 17 plus 25?")], "42.", "43."),
    ),
    ({"prompt": HISTORY, "chosen": [bot("elppa")], "rejected": [bot("apple")]}, record(HISTORY, "elppa", "apple")),
]
TRL_STANDARD = [
    (
        {"prompt": "Write hello in capital letters.", "chosen": "HELLO", "rejected": "hello"},
        record([user("Write hello in capital letters.")], "HELLO", "hello"),
    ),
    (
        {"prompt": "Which is larger, 3 or 9?", "chosen": "9 is larger.", "rejected": "3."},
        record([user("Which is larger, 3 or 9?")], "9 is larger.", "3."),
    ),
]

# schema -> (the format auto-detection must pick, [(row, record)])
SCHEMAS = {
    "hh_rlhf": ("hh_rlhf", HH),
    "ultrafeedback": ("preference", UF),
    "trl_conversational": ("preference", TRL_CONVERSATIONAL),
    "trl_standard": ("preference", TRL_STANDARD),
}


def rows_of(schema):
    return [row for row, _ in SCHEMAS[schema][1]]


# -- formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
def test_each_schema_is_detected_and_converted_exactly(schema):
    fmt, cases = SCHEMAS[schema]
    for row, want in cases:
        assert detect_preference_format(row) == fmt
        assert to_preference_record(row) == want
        assert to_preference_record(row, fmt) == want


def test_ultrafeedback_messages_column_does_not_make_it_sft_data():
    row, want = UF[0]
    assert detect_format(row) == "messages"  # what the SFT reader would take it for
    assert detect_preference_format(row) == "preference"
    # The messages column is not read at all: a different one changes nothing.
    assert to_preference_record({**row, "messages": [uf_msg("user", "other")]}) == want


def hh_bad(chosen, rejected, field, match):
    with pytest.raises(BadRowError, match=match) as info:
        to_preference_record({"chosen": chosen, "rejected": rejected}, origin=Origin("hh.parquet", 12))
    assert info.value.field == field and str(info.value).startswith(f"hh.parquet row 12, field {field!r}: ")


def test_hh_rows_that_compare_no_single_reply_are_bad_rows_naming_the_field():
    one = "\n\nHuman: Which is larger, 3 or 9?\n\nAssistant: 9."
    more = one + "\n\nHuman: Why?\n\nAssistant: 9 is more than 3."
    # Different turn counts: the transcripts part before the last reply.
    hh_bad(more, one.replace("9.", "3."), "rejected", r"differs .* turn 2 \(chosen has 4 turns, rejected 2\)")
    hh_bad(one, more, "rejected", r"\(chosen has 2 turns, rejected 4\)")
    # The same turn count, but an earlier reply differs.
    hh_bad(more, more.replace("9.", "Nine."), "rejected", r"differs .* turn 2, before the last")
    # An empty final reply (the transcript ends at "Assistant:"), in either member.
    hh_bad(one, one.replace(" 9.", ""), "rejected", r"empty final assistant turn \(turn 2\)")
    hh_bad(more.replace(" 9 is more than 3.", " "), more, "chosen", r"empty final assistant turn \(turn 4\)")
    hh_bad(one, one + " ", "rejected", "identical")


def test_ultrafeedback_ties_are_kept_with_their_equal_scores():
    row = UF[1][0]
    assert row["score_chosen"] == row["score_rejected"]
    got = to_preference_record(row)
    assert (got["chosen_score"], got["rejected_score"]) == (7.5, 7.5) and got["chosen"] != got["rejected"]


# -- the rm / dpo stages' loader from the files `datasets` writes -------------------------------------


def write(tmp_path, schema, storage):
    """A Dataset of the schema's rows, written by `datasets` as `storage`; returns the data spec."""
    ds = datasets.Dataset.from_list(rows_of(schema))
    base = str(tmp_path / schema)
    if storage == "parquet":
        ds.to_parquet(base + ".parquet")
        return base + ".parquet"
    if storage == "jsonl":
        ds.to_json(base + ".jsonl")  # JSON lines by default
        return base + ".jsonl"
    if storage == "save_to_disk":
        ds.save_to_disk(base)
        return base
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds.select([0])}).save_to_disk(base)
    return base + ":train_prefs"


def stage_data(stage, tokenizer, train, eval_spec=None, **data):
    config = load_preset(stage, "tiny")
    config.data.update(train=train, eval=eval_spec or train, seq_len=256, batch_size=2, max_pairs=4, **data)
    return pair_data(types.SimpleNamespace(config=config, tokenizer=tokenizer))


def loaded_pairs(loader):
    """example_id -> ((chosen ids, mask), (rejected ids, mask), (chosen z, rejected z, scored)) of one pass."""
    out = {}
    for batch in loader:
        for b, k in zip(*np.nonzero(batch["pair_mask"]), strict=True):
            members = [batch["segment_ids"][b] == s for s in (2 * k + 1, 2 * k + 2)]
            scores = (batch["chosen_score"][b, k], batch["rejected_score"][b, k], batch["score_mask"][b, k])
            i = int(batch["example_id"][b, k])
            assert i not in out, "every pair once"
            out[i] = (*((batch["tokens"][b][m], batch["loss_mask"][b][m]) for m in members), scores)
    return out


def check_pairs(loader, tokenizer, cases, z=(0.0, 1.0)):
    got = loaded_pairs(loader)
    assert sorted(got) == list(range(len(cases)))
    for i, (_, want) in enumerate(cases):
        for (ids, mask), side in zip(got[i][:2], ("chosen", "rejected"), strict=True):
            want_ids, _ = tokenize_chat(tokenizer, want["prompt"] + want[side], "last_assistant")
            assert np.array_equal(ids, want_ids), (i, side)
            assert want[side][0]["content"] in tokenizer.decode(ids[mask == 1]), (i, side)
        cz, rz, scored = got[i][2]
        assert scored == (want["chosen_score"] is not None)
        if scored:
            assert np.allclose([cz, rz], [(want[s] - z[0]) / z[1] for s in ("chosen_score", "rejected_score")])


@pytest.mark.parametrize("storage", ["parquet", "save_to_disk", "jsonl"])
@pytest.mark.parametrize("schema", SCHEMAS)
def test_rm_loader_reads_each_schema_from_each_storage(chatml, tmp_path, schema, storage):
    spec = write(tmp_path, schema, storage)
    data = stage_data("rm", chatml, spec)
    scores = [r[k] for _, r in SCHEMAS[schema][1] for k in ("chosen_score", "rejected_score") if r[k] is not None]
    z = (np.mean(scores), np.std(scores)) if scores else (0.0, 1.0)
    assert data.score_stats == pytest.approx({"mean": z[0], "std": z[1], "count": len(scores)})
    check_pairs(data.eval, chatml, SCHEMAS[schema][1], z)
    assert data.eval.stats()["bad_rows"] == data.eval.stats()["truncated"] == 0
    assert next(data.train)["pair_mask"].sum() > 0


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_saved_ultrafeedback_splits_feed_train_and_eval(chatml, tmp_path, stage):
    """data.train / data.eval as 'DIR:train_prefs' / 'DIR:test_prefs' of one save_to_disk DatasetDict."""
    spec = write(tmp_path, "ultrafeedback", "dataset_dict")
    data = stage_data(stage, chatml, spec, spec.replace(":train_prefs", ":test_prefs"))
    scores = [r[k] for _, r in UF for k in ("chosen_score", "rejected_score")]
    assert data.score_stats["count"] == len(scores)  # from train_prefs, also for test_prefs
    check_pairs(data.eval, chatml, UF[:1], (np.mean(scores), np.std(scores)))
    base = spec.rsplit(":", 1)[0]
    with pytest.raises(ValueError, match=r"holds splits \['test_prefs', 'train_prefs'\], not 'train'.*:SPLIT"):
        stage_data(stage, chatml, base)
    single = write(tmp_path, "hh_rlhf", "save_to_disk")
    with pytest.raises(ValueError, match="without splits"):
        stage_data(stage, chatml, single + ":train")


def test_hh_quirk_rows_stop_the_run_by_name_or_are_counted_and_skipped(chatml, tmp_path, caplog):
    one = "\n\nHuman: Which is larger, 3 or 9?\n\nAssistant: 9."
    quirks = [
        {"chosen": one + "\n\nHuman: Why?\n\nAssistant: 9 is more.", "rejected": one.replace("9.", "3.")},
        {"chosen": one, "rejected": one.replace(" 9.", "")},
    ]
    rows = [rows_of("hh_rlhf")[0], *quirks, *rows_of("hh_rlhf")[1:]]
    path = str(tmp_path / "hh.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    data = stage_data("rm", chatml, path)
    with pytest.raises(BadRowError, match=rf"^{re.escape(path)} row 1, field 'rejected': differs .* \(chosen has 4"):
        list(data.eval)  # in file order: the first bad row stops it
    with pytest.raises(BadRowError, match=r"row [12], field 'rejected'"):
        next(data.train)  # shuffled: either may come first
    with caplog.at_level(logging.WARNING, logger="align_jax.data.pipeline"):
        data = stage_data("dpo", chatml, path, on_bad_row="skip")
        got = loaded_pairs(data.eval)
    assert sorted(got) == [0, 3, 4] and data.eval.stats()["bad_rows"] == 2
    assert f"{path} row 2, field 'rejected': empty final assistant turn" in caplog.text


def test_ultrafeedback_tie_is_a_scored_pair_with_equal_targets(chatml, tmp_path):
    spec = write(tmp_path, "ultrafeedback", "parquet")
    loader = make_preference_iterator(
        {"train": spec, "seq_len": 256, "batch_size": 2, "max_pairs": 4}, chatml, "all_train", 0, 1
    )
    cz, rz, scored = loaded_pairs(loader)[1][2]
    assert scored == 1 and cz == rz
