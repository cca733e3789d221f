"""Preference data: row formats and their bad rows, pair batches and their invariants, hosts, resume, eval,
unpaired (KTO) units, over-long pairs, the pairs-per-row limit, packing efficiency and score normalisation."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from align_jax.config import resolve_data_path
from align_jax.data.formats import BadRowError, Origin
from align_jax.data.packing import _lower_bound, assign_rows
from align_jax.data.preference import (
    PREF_BATCH_FIELDS,
    PreferenceDataConfig,
    ScoreStats,
    compute_score_stats,
    iterate_all,
    make_preference_iterator,
    to_preference_record,
)
from align_jax.data.tokenize import tokenize_chat

T = 256
N = 40
ORIGIN = Origin("prefs.jsonl", 7, "line")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def texts(i):
    """Row i's question, good and bad answers; lengths vary with i; 'item i' names the row."""
    question = f"Tell me item {i}." + " Please explain." * (i % 3)
    good = f"Item {i} is {i * 7}." + " That is it." * (i % 4)
    return question, good, f"I do not know item {i}." + " Sorry." * (i % 3)


def pair_row(i):
    """Row i in one of five paired layouts, all auto-detected; some carry scores."""
    q, good, bad = texts(i)
    kind = i % 5
    if kind == 0:  # HH-RLHF transcripts with an earlier exchange
        head = f"\n\nHuman: Hello there.\n\nAssistant: Hello.\n\nHuman: {q}\n\nAssistant: "
        return {"chosen": head + good, "rejected": head + bad}
    if kind == 1:  # TRL conversational with a system prompt, scored
        prompt = [{"role": "system", "content": "You are a helpful assistant."}, user(q)]
        return {
            "prompt": prompt,
            "chosen": [bot(good)],
            "rejected": [bot(bad)],
            "chosen_score": 8.0 + i % 3,
            "rejected_score": 2.0,
        }
    if kind == 2:  # implicit prompt: two whole conversations
        history = [user("Hello there."), bot("Hello."), user(q)]
        return {"chosen": [*history, bot(good)], "rejected": [*history, bot(bad)]}
    if kind == 3:  # plain strings, scored
        return {"prompt": q, "chosen": good, "rejected": bad, "chosen_score": 9, "rejected_score": 1.5 + i % 4}
    # UltraFeedback: the responses repeat the prompt, scores under their names
    return {
        "prompt": q,
        "chosen": [user(q), bot(good)],
        "rejected": [user(q), bot(bad)],
        "score_chosen": 7.0,
        "score_rejected": 3.0,
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", [pair_row(i) for i in range(N)])


def config(train, **kw):
    return {"train": train, "seq_len": T, "batch_size": 2, "pack_window": 8, **kw}


def take(it, n):
    return [next(it) for _ in range(n)]


def bad(row, field, match, fmt="auto"):
    with pytest.raises(BadRowError, match=match) as info:
        to_preference_record(row, fmt, ORIGIN)
    assert info.value.field == field and str(info.value).startswith("prefs.jsonl line 7")


# -- formats -------------------------------------------------------------------------------------------


def test_hh_rlhf_transcripts_split_into_prompt_and_responses():
    head = (
        "\n\nHuman: Can you help me plan a trip?\nI have two days.  \n\nAssistant: Sure.\n\nWhere to?"
        "\n\nHuman:   Paris, in May. \n\nAssistant:"
    )
    row = {"chosen": head + " Day one: the Louvre.\nDay two: Montmartre.\n", "rejected": head + " No."}
    record = to_preference_record(row, origin=ORIGIN)
    assert record == {
        "prompt": [
            user("Can you help me plan a trip?\nI have two days."),
            bot("Sure.\n\nWhere to?"),  # "\n\n" inside a turn stays when no speaker follows it
            user("Paris, in May."),
        ],
        "chosen": [bot("Day one: the Louvre.\nDay two: Montmartre.")],
        "rejected": [bot("No.")],
        "chosen_score": None,
        "rejected_score": None,
    }
    # No leading blank lines, trailing space: the same record.
    plain = {k: v.lstrip("\n") + "  " for k, v in row.items()}
    assert to_preference_record(plain, "hh_rlhf") == record


@pytest.mark.parametrize(
    "row,field,match",
    [
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Yes", "rejected": "\n\nHuman: Hi\n\nAssistant: Yes "},
            "rejected",
            "identical",
        ),
        ({"chosen": "\n\nHuman: Hi there", "rejected": "\n\nHuman: Hi\n\nAssistant: x"}, "chosen", "no assistant turn"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Ho\n\nAssistant: b"},
            "rejected",
            "differs .* turn 1",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: a\n\nHuman: more", "rejected": "\n\nHuman: Hi\n\nAssistant: b"},
            "chosen",
            "ends with a user turn",
        ),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant:  ", "rejected": "\n\nHuman: Hi\n\nAssistant: b"},
            "chosen",
            "empty final assistant turn",
        ),
        (
            {"chosen": "Hi\n\nAssistant: a", "rejected": "\n\nHuman: Hi\n\nAssistant: b"},
            "chosen",
            "text before the first turn",
        ),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: a"}, "rejected", "missing"),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": 3}, "rejected", "expected a string, got int"),
    ],
    ids=[
        "identical",
        "no-assistant",
        "prompts-differ",
        "ends-with-human",
        "empty-answer",
        "preamble",
        "missing",
        "type",
    ],
)
def test_hh_rlhf_bad_rows_name_file_row_and_field(row, field, match):
    bad(row, field, match)


def test_conversational_ultrafeedback_implicit_and_plain_forms_agree():
    q, good, worse = "What is 17 plus 25?", "17 plus 25 is 42.", "It is 43."
    expected = {"prompt": [user(q)], "chosen": [bot(good)], "rejected": [bot(worse)]}
    rows = [
        {"prompt": [user(q)], "chosen": [bot(good)], "rejected": [bot(worse)]},  # TRL conversational
        {"prompt": q, "chosen": [user(q), bot(good)], "rejected": [user(q), bot(worse)]},  # UltraFeedback
        {"chosen": [user(q), bot(good)], "rejected": [user(q), bot(worse)]},  # TRL implicit prompt
        {"prompt": q, "chosen": good, "rejected": worse},  # plain strings
        {"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {worse}"},
    ]
    for row in rows:
        assert to_preference_record(row) == {**expected, "chosen_score": None, "rejected_score": None}, row
    scored = to_preference_record({**rows[1], "score_chosen": 8, "score_rejected": 2.5})
    assert (scored["chosen_score"], scored["rejected_score"]) == (8.0, 2.5)
    # The implicit prompt is everything before the last turn, system message and history included.
    history = [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello"), user(q)]
    record = to_preference_record({"chosen": [*history, bot(good)], "rejected": [*history, bot(worse)]})
    assert record["prompt"] == history and record["chosen"] == [bot(good)]


@pytest.mark.parametrize(
    "row,field,match",
    [
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1.0},
            "rejected_score",
            "scores come in pairs",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "rejected_score": 1.0},
            "chosen_score",
            "scores come in pairs",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": math.nan, "rejected_score": 1},
            "chosen_score",
            "finite",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": 1, "rejected_score": -math.inf},
            "rejected_score",
            "finite",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": "9", "rejected_score": 1},
            "chosen_score",
            "number, got str",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_score": True, "rejected_score": 1},
            "chosen_score",
            "number, got bool",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical"),
        ({"prompt": "q", "chosen": [bot("a"), bot("c")], "rejected": "b"}, "chosen", "one assistant message"),
        ({"prompt": "q", "chosen": [user("a")], "rejected": "b"}, "chosen", r"roles \['user'\]"),
        ({"prompt": [user("q"), bot("a")], "chosen": "a", "rejected": "b"}, "prompt[1]", "end with a user turn"),
        (
            {"prompt": [user("q"), {"role": "system", "content": "s"}], "chosen": "a", "rejected": "b"},
            "prompt[1]",
            "system",
        ),
        ({"prompt": "q", "chosen": [bot(" ")], "rejected": "b"}, "chosen[0]", "empty assistant turn"),
        ({"chosen": [user("q"), bot("a")], "rejected": [user("p"), bot("b")]}, "rejected", "differs .* turn 1"),
        ({"chosen": [bot("a")], "rejected": [bot("b")]}, "chosen", "no user turn"),
        ({"chosen": "a", "rejected": "b", "prompt": None, "extra": 1}, "chosen", "not an HH-RLHF transcript"),
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ({"question": "q", "answer": "a"}, None, "cannot tell the format"),
    ],
)
def test_paired_bad_rows_name_file_row_and_field(row, field, match):
    bad(row, field, match)


def test_unpaired_kto_rows():
    assert to_preference_record({"prompt": "Hi", "completion": "Hello", "label": True}) == {
        "prompt": [user("Hi")],
        "completion": [bot("Hello")],
        "label": True,
    }
    record = to_preference_record({"prompt": [user("Hi")], "completion": [user("Hi"), bot("Bye")], "label": False})
    assert record == {"prompt": [user("Hi")], "completion": [bot("Bye")], "label": False}
    bad({"prompt": "Hi", "completion": "Hello", "label": 1}, "label", "true or false, got int")
    bad({"prompt": "Hi", "completion": "Hello"}, "label", "missing")
    bad({"prompt": "Hi", "completion": "", "label": True}, "completion", "empty assistant turn")
    with pytest.raises(ValueError, match="format="):
        to_preference_record({}, "dpo")


# -- batches -------------------------------------------------------------------------------------------


def members(batch, b, k):
    """(tokens, loss_mask, start) of the chosen and rejected segments of pair k in row b."""
    out = []
    for seg in (2 * k + 1, 2 * k + 2):
        idx = np.flatnonzero(batch["segment_ids"][b] == seg)
        assert len(idx) and (np.diff(idx) == 1).all()
        assert (batch["positions"][b, idx] == np.arange(len(idx))).all()
        out.append((batch["tokens"][b, idx], batch["loss_mask"][b, idx], idx[0]))
    (_, _, c0), (_, _, r0) = out
    assert r0 == c0 + len(out[0][0]), "rejected follows chosen immediately"
    return out


def check_batch(batch, tokenizer, records, stats=None, max_pairs=T // 32):
    """Every invariant of the batch contract; returns the example ids of its pairs (with kto_label)."""
    assert set(batch) == set(PREF_BATCH_FIELDS)
    b = batch["tokens"].shape[0]
    for k in PREF_BATCH_FIELDS:
        shape = (b, T) if k in ("tokens", "positions", "segment_ids", "loss_mask") else (b, max_pairs)
        assert batch[k].shape == shape, k
        assert batch[k].dtype == (np.float32 if k.endswith("_score") else np.int32), k
    assert (
        not batch["loss_mask"][batch["segment_ids"] == 0].any() and not batch["tokens"][batch["segment_ids"] == 0].any()
    )
    seen = []
    for row in range(b):
        n = int(batch["pair_mask"][row].sum())
        assert (batch["pair_mask"][row] == (np.arange(max_pairs) < n)).all()
        assert batch["segment_ids"][row].max() == 2 * n
        assert (batch["example_id"][row, n:] == -1).all() and (batch["example_id"][row, :n] >= 0).all()
        for k in ("chosen_score", "rejected_score", "score_mask", "kto_label"):
            assert not batch[k][row, n:].any()
        for k in range(n):
            i = int(batch["example_id"][row, k])
            (ids_c, mask_c, _), (ids_r, mask_r, _) = members(batch, row, k)
            record = records[i]
            for ids, mask, response in ((ids_c, mask_c, record["chosen"]), (ids_r, mask_r, record["rejected"])):
                want_ids, want_mask = tokenize_chat(tokenizer, record["prompt"] + response, "last_assistant")
                assert np.array_equal(ids, want_ids)  # prompt + response, nothing else
                assert mask[0] == 0 and np.array_equal(mask[1:], want_mask[1:])
                assert response[0]["content"] in tokenizer.decode(ids[mask == 1])  # the loss is on the response
                assert f"item {i}" in tokenizer.decode(ids[mask == 0])  # the prompt has none
            p = int(np.argmax(mask_c))
            assert p == int(np.argmax(mask_r)) and np.array_equal(ids_c[:p], ids_r[:p]), "shared prompt tokens"
            scored = record["chosen_score"] is not None
            assert batch["score_mask"][row, k] == scored and batch["kto_label"][row, k] == 0
            if scored and stats is not None:
                want = [(record[s] - stats.mean) / stats.std for s in ("chosen_score", "rejected_score")]
                assert np.allclose([batch["chosen_score"][row, k], batch["rejected_score"][row, k]], want)
            seen.append(i)
    return seen


def records_of(rows):
    return [to_preference_record(r) for r in rows]


def first_epoch(it, tokenizer, records):
    assert it.host_batch == 1
    seen = []
    while True:
        batch = next(it)
        if it.state()["epoch"] > 0:
            return seen
        seen += check_batch(batch, tokenizer, records, ScoreStats(**it.score_stats()))


def test_batches_keep_the_contract_and_hosts_cover_every_pair_once(tokenizer, pairs_file):
    records = records_of(pair_row(i) for i in range(N))
    shares = []
    for p in range(2):
        it = make_preference_iterator(config(pairs_file), tokenizer, process_index=p, process_count=2)
        seen = first_epoch(it, tokenizer, records)
        assert sorted(seen) == sorted(it.epoch_order(0).tolist())  # each pair of the share once
        shares.append(set(seen))
        stats = it.stats()
        assert stats["bad_rows"] == stats["truncated"] == stats["dropped"] == stats["no_target"] == 0
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(N))


def test_pairs_per_row_limit(chatml, pairs_file):
    records = records_of(pair_row(i) for i in range(N))
    it = make_preference_iterator(
        config(pairs_file, max_pairs=2, batch_size=4), chatml, process_index=0, process_count=1
    )
    batches = take(it, 6)
    for batch in batches:
        check_batch(batch, chatml, records, max_pairs=2)
    assert max(int(b["pair_mask"].sum(axis=1).max()) for b in batches) == 2  # the limit binds on these short pairs


# A window packs into about five rows and a batch takes two: positions at the start, mid-window, in later
# windows and in epoch 1.
@pytest.mark.parametrize("n_before", [0, 3, 11, 14])
def test_resume_yields_exactly_the_batches_that_would_have_come(chatml, pairs_file, n_before):
    cfg = config(pairs_file)
    it = make_preference_iterator(cfg, chatml, process_index=0, process_count=1)
    take(it, n_before)
    state = json.loads(json.dumps(it.state()))
    expected = take(it, 8)
    resumed = make_preference_iterator(cfg, chatml, process_index=0, process_count=1)
    resumed.restore(state)
    for x, y in zip(take(resumed, 8), expected, strict=True):
        for k in PREF_BATCH_FIELDS:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
    assert resumed.stats() == it.stats()
    for change in ({"max_pairs": 3}, {"unpaired": True}, {"seq_len": 320}):
        other = make_preference_iterator({**cfg, **change}, chatml, process_index=0, process_count=1)
        with pytest.raises(ValueError, match=next(iter(change))):
            other.restore(state)


def test_eval_and_iterate_all_give_every_pair_once_in_padded_batches(chatml, pairs_file):
    records = records_of(pair_row(i) for i in range(N))
    cfg = config(pairs_file, eval=pairs_file, batch_size=6)
    hosts = [make_preference_iterator(cfg, chatml, split="eval", process_index=p, process_count=2) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) > 1
    batches = [list(h) for h in hosts]
    seen = [i for host in batches for batch in host for i in check_batch(batch, chatml, records)]
    assert sorted(seen) == list(range(N))
    last = {k: np.concatenate([batches[0][-1][k], batches[1][-1][k]]) for k in PREF_BATCH_FIELDS}
    empty = last["pair_mask"].sum(axis=1) == 0
    assert empty.any() and (last["example_id"][empty] == -1).all() and not last["segment_ids"][empty].any()
    streamed = [list(iterate_all(cfg, chatml, "eval", process_index=p, process_count=2)) for p in range(2)]
    for ours, theirs in zip([*streamed, list(hosts[0])], [*batches, batches[0]], strict=True):  # and again
        assert len(ours) == len(theirs)
        for x, y in zip(ours, theirs, strict=True):
            assert all(np.array_equal(x[k], y[k]) for k in PREF_BATCH_FIELDS)
    assert len(iterate_all(cfg, chatml, "train", process_index=0, process_count=1)) == len(hosts[0])
    alias = make_preference_iterator(cfg, chatml, "all_eval", 0, 2)
    assert not alias._cache and alias.num_rows == N and len(alias) == len(hosts[0])


def test_score_normalisation_uses_the_train_split_for_every_split(chatml, pairs_file, tmp_path):
    rows = [pair_row(i) for i in range(N)]
    raw = [
        s
        for r in rows
        for s in (r.get("chosen_score", r.get("score_chosen")), r.get("rejected_score", r.get("score_rejected")))
    ]
    raw = [s for s in raw if s is not None]
    stats = compute_score_stats(config(pairs_file))
    assert stats == ScoreStats(pytest.approx(np.mean(raw)), pytest.approx(np.std(raw)), len(raw))
    # An eval set on another scale is still normalised with the train split's mean and std.
    shifted = [{**r, "chosen_score": 100.0, "rejected_score": 50.0} for r in rows[1:10:5]]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", shifted)
    batch = next(iter(make_preference_iterator(config(pairs_file, eval=eval_file), chatml, "eval", 0, 1)))
    got = batch["chosen_score"][batch["score_mask"] == 1]
    assert len(got) == 2 and np.allclose(got, (100.0 - stats.mean) / stats.std)
    given = make_preference_iterator(
        config(pairs_file, eval=eval_file), chatml, "eval", 0, 1, score_stats={"mean": 0, "std": 2}
    )
    assert np.allclose(next(iter(given))["rejected_score"][batch["score_mask"] == 1], 25.0)
    unscored = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2)
    assert compute_score_stats({"train": unscored}) == ScoreStats(0.0, 1.0, 0)


# -- over-long pairs -----------------------------------------------------------------------------------


def test_over_long_pairs_are_truncated_keeping_the_prompt_or_dropped(chatml, tmp_path):
    q = "Tell me item 1."
    long_answer, short_answer = "Hello there, how are you today? " * 12, "HELLO"
    rows = [
        {"prompt": q, "chosen": long_answer, "rejected": short_answer},
        {
            "prompt": "Tell me item 2." + " Reverse the word apple." * 20,
            "chosen": "a",
            "rejected": "b",
        },  # prompt too long
        {"prompt": "Tell me item 3.", "chosen": "17 plus 25 is 42.", "rejected": "It is 43."},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    seq_len = 96
    truncated = iterate_all(
        {"train": path, "seq_len": seq_len, "batch_size": 1}, chatml, process_index=0, process_count=1
    )
    batches = list(truncated)
    stats = truncated.stats()
    assert (stats["truncated"], stats["dropped"], stats["examples"]) == (1, 1, 2)
    for batch in batches:
        if batch["example_id"][0, 0] != 0:
            continue
        (ids_c, mask_c, _), (ids_r, _, _) = members(batch, 0, 0)
        full_c = tokenize_chat(chatml, [user(q), bot(long_answer)], "last_assistant")[0]
        full_r = tokenize_chat(chatml, [user(q), bot(short_answer)], "last_assistant")[0]
        assert len(ids_c) + len(ids_r) == seq_len and np.array_equal(ids_r, full_r)  # only the long one is cut
        assert np.array_equal(ids_c, full_c[: len(ids_c)]) and mask_c[-1] == 1  # whole prompt, response cut
    dropped = iterate_all(
        {"train": path, "seq_len": seq_len, "batch_size": 1, "over_long": "drop"},
        chatml,
        process_index=0,
        process_count=1,
    )
    assert sorted(int(i) for b in dropped for i in b["example_id"][b["pair_mask"] == 1]) == [2]
    assert dropped.stats()["dropped"] == 2


# -- unpaired (KTO) ------------------------------------------------------------------------------------


def kto_row(i):
    q, good, worse = texts(i)
    return {"prompt": q, "completion": good if i % 3 else worse, "label": bool(i % 3)}


def test_unpaired_rows_pair_with_the_next_valid_rows_completion(chatml, tmp_path, caplog):
    rows = [kto_row(i) for i in range(12)]
    rows[5] = {"prompt": "Tell me item 5.", "completion": "x"}  # bad: no label; row 4's partner is row 6
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = {"train": path, "seq_len": T, "batch_size": 1, "pack_window": 4, "on_bad_row": "skip"}
    with caplog.at_level(logging.WARNING, logger="align_jax.data.pipeline"):
        loader = iterate_all(cfg, chatml, process_index=0, process_count=1)
        assert loader.unpaired_output
        seen = set()
        for batch in loader:
            for k in range(int(batch["pair_mask"][0].sum())):
                i = int(batch["example_id"][0, k])
                partner = {4: 6, 11: 0}.get(i, i + 1)
                (ids, _, _), (kl_ids, kl_mask, _) = members(batch, 0, k)
                assert np.array_equal(
                    ids,
                    tokenize_chat(chatml, [user(rows[i]["prompt"]), bot(rows[i]["completion"])], "last_assistant")[0],
                )
                kl = tokenize_chat(
                    chatml, [user(rows[i]["prompt"]), bot(rows[partner]["completion"])], "last_assistant"
                )
                assert np.array_equal(kl_ids, kl[0]) and np.array_equal(kl_mask[1:], kl[1][1:]) and kl_mask.any()
                assert batch["kto_label"][0, k] == rows[i]["label"] and not batch["score_mask"][0, k]
                seen.add(i)
    assert seen == set(range(12)) - {5} and loader.stats()["bad_rows"] == 1
    assert len(caplog.records) == 1 and f"{path} line 6, field 'label': missing" in caplog.records[0].getMessage()
    # A KTO row in paired data is a bad row.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [pair_row(1), kto_row(1)])
    with pytest.raises(BadRowError, match="line 2, field 'label': an unpaired"):
        list(iterate_all({"train": mixed, "seq_len": T, "batch_size": 1}, chatml, process_index=0, process_count=1))


def test_paired_rows_as_unpaired_units(chatml, pairs_file):
    records = records_of(pair_row(i) for i in range(N))
    loader = iterate_all(config(pairs_file, unpaired=True), chatml, process_index=0, process_count=1)
    units = set()
    for batch in loader:
        for row in range(batch["tokens"].shape[0]):
            for k in range(int(batch["pair_mask"][row].sum())):
                i, label = int(batch["example_id"][row, k]), int(batch["kto_label"][row, k])
                side = "chosen" if label else "rejected"
                (ids, _, _), (kl_ids, _, _) = members(batch, row, k)
                prompt = records[i]["prompt"]
                assert np.array_equal(ids, tokenize_chat(chatml, prompt + records[i][side], "last_assistant")[0])
                partner = records[(i + 1) % N][side]  # the next row's response of the same kind
                assert np.array_equal(kl_ids, tokenize_chat(chatml, prompt + partner, "last_assistant")[0])
                units.add((i, label))
    assert units == {(i, label) for i in range(N) for label in (0, 1)} and loader.stats()["examples"] == 2 * N


# -- packing -------------------------------------------------------------------------------------------


def pair_lengths(n, seed, seq_len):
    """Pair lengths like the demo preference data's: twice a shared prompt plus two log-normal responses,
    mean ~0.35 seq_len, 10% over ~0.49 seq_len."""
    rng = np.random.default_rng(seed)
    prompt = seq_len * (0.05 + 0.035 * rng.lognormal(0, 0.6, n))
    responses = seq_len * 0.065 * rng.lognormal(0, 0.7, (2, n))
    return np.maximum(2 * prompt + responses.sum(0), 8).astype(int)


@pytest.mark.parametrize("seq_len", [256, 512])
def test_packing_efficiency_on_a_realistic_pair_length_mix(seq_len):
    # Measured: 99.3% at 256, 99.1% at 512 (97.1-99.7% on the demo pairs: see preference.py's docstring).
    lengths = pair_lengths(3000, 0, seq_len)
    lengths = lengths[lengths <= seq_len].tolist()
    rows = []
    for lo in range(0, len(lengths), 1000):
        window = lengths[lo : lo + 1000]
        packed = assign_rows(window, seq_len, seq_len // 32)
        assert sorted(i for r in packed for i in r) == list(range(len(window)))
        assert all(len(r) <= seq_len // 32 and sum(window[i] for i in r) <= seq_len for r in packed)
        rows += packed
    efficiency = sum(lengths) / (len(rows) * seq_len)
    assert efficiency >= 0.97, efficiency


@pytest.mark.parametrize("max_items", [1, 2, 3, 5])
def test_rows_hold_at_most_max_items_and_stay_exact(max_items):
    lengths = np.random.default_rng(max_items).integers(8, 60, 400).tolist()
    rows = assign_rows(lengths, 128, max_items)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(len(r) <= max_items and sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) >= _lower_bound(lengths, 128, max_items)
    assert rows == assign_rows(lengths, 128, max_items)  # deterministic
    if max_items == 1:
        assert len(rows) == len(lengths)


def test_demo_preference_files_read_cleanly(chatml):
    cfg = {"train": "demo:pref_eval", "eval": "demo:pref_eval", "seq_len": 512, "batch_size": 4}
    assert resolve_data_path("demo:pref_train").endswith("align_jax/data/demo/pref_train.jsonl")
    loader = make_preference_iterator(cfg, chatml, split="eval", process_index=0, process_count=1)
    ids = sorted(int(i) for b in loader for i in b["example_id"][b["pair_mask"] == 1])
    stats = loader.stats()
    assert ids == list(range(loader.num_rows)) and stats["bad_rows"] == 0
    assert stats["packing_efficiency"] > 0.95 and loader.score_stats()["count"] > 0


def test_config_checks():
    assert PreferenceDataConfig().pairs_per_row == 1024 // 32 and PreferenceDataConfig(max_pairs=3).pairs_per_row == 3
    with pytest.raises(ValueError, match=r"unknown data config keys \['loss_on'\]"):
        PreferenceDataConfig.from_any({"loss_on": "all"})
    with pytest.raises(ValueError, match="unpaired"):
        PreferenceDataConfig(unpaired=1)
    with pytest.raises(ValueError, match="format"):
        PreferenceDataConfig(format="messages")
    with pytest.raises(ValueError, match=r"data\.eval is not set"):
        make_preference_iterator({"train": "x.jsonl"}, None, split="eval")
