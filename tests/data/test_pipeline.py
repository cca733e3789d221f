"""The loader: sources, seeded shuffling, host shares, exact resume, eval batches, global batches."""

from __future__ import annotations

import json
import logging
import re
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from align_jax.data.formats import BadRowError
from align_jax.data.packing import FIELDS
from align_jax.data.pipeline import SFTDataConfig, global_batch, make_sft_iterator
from align_jax.sharding import make_mesh

N = 40
T = 128  # room for three or four of these chats per row


def row(i):
    """Row i in one of three formats (auto-detected per row); its text names `item i` once."""
    question, answer = f"Tell me item {i}.", f"Here it is: {i * 7}."
    if i % 3 == 0:
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if i % 3 == 1:
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return {"instruction": question, "output": answer}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", [row(i) for i in range(N)])


def config(train, **kw):
    return {"train": train, "seq_len": T, "batch_size": 2, "pack_window": 8, **kw}


def items(tokenizer, batch):
    """The item number of every packed sequence in a batch, row by row, segment by segment."""
    out = []
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
        for s in range(1, seg.max() + 1):
            out.append(int(re.search(r"item (\d+)", tokenizer.decode(tokens[seg == s])).group(1)))
    return out


def first_epoch(it, tokenizer):
    """Items of every row yielded before the iterator entered epoch 1 (one row per batch, so a batch
    never mixes epochs)."""
    assert it.host_batch == 1
    seen = []
    while True:
        batch = next(it)
        if it.state()["epoch"] > 0:
            return seen
        seen += items(tokenizer, batch)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(y) == set(FIELDS)
        for k in FIELDS:
            assert x[k].dtype == np.int32 and np.array_equal(x[k], y[k]), k


def test_batches_have_the_contract_shapes(chatml, jsonl):
    batch = next(make_sft_iterator(config(jsonl), chatml, process_index=0, process_count=1))
    for k in FIELDS:
        assert batch[k].shape == (2, T) and batch[k].dtype == np.int32
    assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()
    starts = batch["positions"] == 0
    assert (batch["loss_mask"][starts] == 0).all() and batch["loss_mask"].sum() > 0


def test_each_epoch_shuffles_by_seed_and_epoch(chatml, jsonl):
    def make(seed):
        return make_sft_iterator(config(jsonl, shuffle_seed=seed), chatml, process_index=0, process_count=1)

    a, b, other = make(0), make(0), make(1)
    assert np.array_equal(a.epoch_order(0), b.epoch_order(0))
    assert np.array_equal(a.epoch_order(3), b.epoch_order(3))
    assert sorted(a.epoch_order(0)) == sorted(a.epoch_order(1)) == list(range(N))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), other.epoch_order(0))
    assert_same_batches(take(a, 12), take(b, 12))  # 12 batches run well into epoch 2


def test_hosts_read_disjoint_shares_that_cover_the_data(chatml, jsonl):
    shares = []
    for p in range(2):
        it = make_sft_iterator(config(jsonl, batch_size=2), chatml, process_index=p, process_count=2)
        assert len(it.epoch_order(0)) == N // 2
        seen = first_epoch(it, chatml)
        assert sorted(seen) == sorted(it.epoch_order(0).tolist())  # every example of the share, once
        shares.append(set(seen))
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(N))


def test_one_host_epoch_yields_every_example_once(chatml, jsonl):
    it = make_sft_iterator(config(jsonl, batch_size=1), chatml, process_index=0, process_count=1)
    assert sorted(first_epoch(it, chatml)) == list(range(N))
    stats = it.stats()
    assert stats["examples"] >= N and stats["bad_rows"] == stats["truncated"] == stats["dropped"] == 0
    assert 0.5 < stats["packing_efficiency"] <= 1.0


# With these settings a window packs into 3 rows and a batch takes 2, so the saved positions include
# the very start, the middle of a window, just before an epoch boundary, and inside epoch 1.
@pytest.mark.parametrize("n_before", [0, 4, 7, 9])
def test_resume_yields_exactly_the_batches_that_would_have_come(chatml, jsonl, n_before):
    cfg = config(jsonl)
    it = make_sft_iterator(cfg, chatml, process_index=0, process_count=1)
    take(it, n_before)
    state = json.loads(json.dumps(it.state()))  # what a checkpoint stores
    assert state["window_read"] == (n_before > 0)
    expected = take(it, 8)  # crosses windows and an epoch boundary

    resumed = make_sft_iterator(cfg, chatml, process_index=0, process_count=1)
    resumed.restore(state)
    assert_same_batches(take(resumed, 8), expected)
    assert resumed.stats() == it.stats()


def test_resume_refuses_other_settings(chatml, jsonl):
    it = make_sft_iterator(config(jsonl), chatml, process_index=0, process_count=1)
    next(it)
    other = make_sft_iterator(config(jsonl, seq_len=96), chatml, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seq_len"):
        other.restore(it.state())
    elsewhere = make_sft_iterator(config(jsonl), chatml, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process"):
        elsewhere.restore(it.state())


def test_json_and_parquet_and_split_files_give_the_same_batches(chatml, jsonl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row(i) for i in range(N)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    # One column per key of any row (from_pylist would take the first row's keys only): mixed formats
    # give null columns, which format detection must ignore.
    table = pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(rows))])
    assert table.num_columns == 4
    pq.write_table(table, tmp_path / "train.parquet")
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", rows[:15])
    write_jsonl(tmp_path / "parts" / "b.jsonl", rows[15:])

    def first(spec):
        return take(make_sft_iterator(config(spec), chatml, process_index=0, process_count=1), 6)

    expected = first(jsonl)
    for spec in (
        str(tmp_path / "train.json"),
        str(tmp_path / "train.parquet"),
        str(tmp_path / "parts" / "*.jsonl"),
        [str(tmp_path / "parts" / "a.jsonl"), str(tmp_path / "parts" / "b.jsonl")],
    ):
        assert_same_batches(first(spec), expected)


def test_a_saved_datasets_directory_is_a_source(chatml, jsonl, tmp_path):
    import datasets

    datasets.Dataset.from_list([row(i) for i in range(0, N, 3)]).save_to_disk(str(tmp_path / "ds"))
    it = make_sft_iterator(config(str(tmp_path / "ds"), batch_size=1), chatml, process_index=0, process_count=1)
    assert sorted(first_epoch(it, chatml)) == list(range(0, N, 3))


def bad_file(tmp_path):
    """8 good rows and three bad ones: invalid UTF-8, broken JSON, a missing field (lines 3, 6, 9)."""
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps(row(i)).encode() for i in range(8)]
    bad = [
        json.dumps({"prompt": "caf", "completion": "x"}).encode().replace(b"caf", b"caf\xff"),
        b'{"messages": [',
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}).encode(),
    ]
    lines = good[:2] + bad[:1] + good[2:4] + bad[1:2] + good[4:6] + bad[2:] + good[6:]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_row_error_names_file_line_and_field(chatml, tmp_path):
    path = bad_file(tmp_path)
    it = make_sft_iterator(config(path, batch_size=1), chatml, process_index=0, process_count=1)
    with pytest.raises(BadRowError) as info:
        for _ in range(20):
            next(it)
    err = info.value
    assert err.file == path and err.row in (3, 6, 9) and str(err).startswith(f"{path} line {err.row}")
    expected_field = {3: "prompt", 6: None, 9: "messages[0].content"}[err.row]
    assert err.field == expected_field


def test_skip_mode_counts_and_logs_bad_rows(chatml, tmp_path, caplog):
    path = bad_file(tmp_path)
    it = make_sft_iterator(config(path, batch_size=1, on_bad_row="skip"), chatml, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="align_jax.data.pipeline"):
        seen = items(chatml, next(it))  # reads the first window: the whole (small) file
        assert it.stats()["bad_rows"] == 3
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 3 and all(path in m for m in logged)
        assert any("undecodable" in m and "'prompt'" in m and "line 3" in m for m in logged)
        assert any("not valid JSON" in m and "line 6" in m for m in logged)
        assert any("'messages[0].content': missing" in m and "line 9" in m for m in logged)
        seen += first_epoch(it, chatml)
        assert sorted(seen) == list(range(8))
    # The last batch came from epoch 1: its window was read again, but the same three rows are neither
    # counted nor logged twice (bad_rows counts distinct rows, not visits).
    assert it.stats()["epoch"] == 1 and it.stats()["bad_rows"] == 3
    assert len(caplog.records) == 3


def test_eval_batches_are_ordered_padded_and_the_same_count_on_every_host(chatml, jsonl):
    cfg = config(jsonl, eval=jsonl, batch_size=6)
    hosts = [make_sft_iterator(cfg, chatml, split="eval", process_index=p, process_count=2) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) > 1
    batches = [list(h) for h in hosts]
    seen = []
    for b0, b1 in zip(*batches, strict=True):
        for k in FIELDS:
            assert b0[k].shape == b1[k].shape == (3, T)
        seen += items(chatml, {k: np.concatenate([b0[k], b1[k]]) for k in FIELDS if k != "loss_mask"})
    assert sorted(seen) == list(range(N))  # each example once, over both hosts
    last = {k: np.concatenate([batches[0][-1][k], batches[1][-1][k]]) for k in FIELDS}
    empty = last["segment_ids"].max(axis=1) == 0
    assert empty.any() and not last["loss_mask"][empty].any() and not last["tokens"][empty].any()
    assert_same_batches(list(hosts[0]), batches[0])  # iterating again starts over


def test_global_batch_is_sharded_over_the_data_axes(chatml, jsonl):
    mesh = make_mesh({"data": 8})
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    host = next(make_sft_iterator(config(jsonl, batch_size=8), chatml, process_index=0, process_count=1))
    batch = global_batch(host, sharding)
    assert set(batch) == set(FIELDS)
    for k, arr in batch.items():
        assert isinstance(arr, jax.Array) and arr.shape == (8, T) and arr.dtype == np.int32
        assert arr.sharding.is_equivalent_to(sharding, 2)
        assert len(arr.addressable_shards) == 8 and {s.data.shape for s in arr.addressable_shards} == {(1, T)}
        assert np.array_equal(np.asarray(arr), host[k])
    with pytest.raises(ValueError, match="'tokens'"):
        global_batch({"tokens": host["tokens"][:6]}, sharding)


def test_config_sources_and_errors(chatml, jsonl, monkeypatch):
    as_configdict = ml_collections.ConfigDict(config(jsonl, eval=None))
    it = make_sft_iterator(as_configdict, chatml)
    assert it.cfg == SFTDataConfig(**config(jsonl))
    assert (it.process_index, it.process_count) == (jax.process_index(), jax.process_count()) == (0, 1)
    with pytest.raises(ValueError, match=r"unknown data config keys \['sequence_length'\]"):
        make_sft_iterator({**config(jsonl), "sequence_length": 8}, chatml)
    with pytest.raises(ValueError, match="loss_on"):
        make_sft_iterator(config(jsonl, loss_on="everything"), chatml)
    with pytest.raises(ValueError, match=r"data\.eval is not set"):
        make_sft_iterator(config(jsonl), chatml, split="eval")
    with pytest.raises(ValueError, match="not divisible"):
        make_sft_iterator(config(jsonl, batch_size=3), chatml, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match="no files match"):
        make_sft_iterator(config(jsonl + ".missing/*.jsonl"), chatml)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"align_jax\[tfds\]"):
        make_sft_iterator(config("tfds:my_sft/train"), chatml)


def test_host_states_round_trip_through_the_checkpoint_format():
    from align_jax.data.pipeline import gather_host_states, host_state

    state = {"version": 1, "epoch": 2, "window": 3, "rows_done": 4, "settings": {"seq_len": 64}}
    saved = gather_host_states(state)
    assert saved == {"hosts": [state]}
    assert host_state(json.loads(json.dumps(saved))) == state
    with pytest.raises(ValueError, match="data position of 2 hosts; this run has 1"):
        host_state({"hosts": [state, state]})
    with pytest.raises(ValueError, match="no 'hosts' list"):
        host_state(state)
