"""The reference log-prob cache: what its key depends on, atomic tables, lookup by example."""

from __future__ import annotations

import os

import numpy as np
import pytest

from align_jax import reference


class FakeTokenizer:
    def __init__(self, vocab, template):
        self.vocab, self.chat_template = vocab, template
        self.special_tokens_map = {"eos_token": "<e>"}

    def get_vocab(self):
        return dict(self.vocab)


def test_key_changes_with_data_tokenizer_template_and_reference(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"0" * 16)
    tok = FakeTokenizer({"a": 0, "b": 1}, "{{ messages }}")

    def key(tokenizer=tok, path=str(data), init_from=str(hf)):
        return reference.cache_key(
            data=reference.data_fingerprint(path),
            tokenizer=reference.tokenizer_fingerprint(tokenizer),
            reference=reference.reference_fingerprint(init_from, 0, {"hidden_size": 8}),
        )

    base = key()
    assert key() == base  # deterministic
    assert key(tokenizer=FakeTokenizer({"a": 0, "b": 2}, "{{ messages }}")) != base
    assert key(tokenizer=FakeTokenizer({"a": 0, "b": 1}, "{{ other }}")) != base
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    assert key() != base
    changed_data = key()
    (hf / "model.safetensors").write_bytes(b"1" * 17)  # new weights
    assert key() != changed_data
    assert reference.reference_fingerprint("", 0, {}) != reference.reference_fingerprint("", 1, {})


def test_workdir_reference_fingerprint_follows_the_latest_step(tmp_path):
    step = tmp_path / "checkpoints" / "10" / "state"
    step.mkdir(parents=True)
    (step / "data").write_bytes(b"x")
    first = reference.reference_fingerprint(str(tmp_path), 0, {})
    later = tmp_path / "checkpoints" / "20" / "state"
    later.mkdir(parents=True)
    (later / "data").write_bytes(b"y")
    assert reference.reference_fingerprint(str(tmp_path), 0, {}) != first
    with pytest.raises(FileNotFoundError):
        reference.reference_fingerprint(str(tmp_path / "nothing"), 0, {})


def test_tables_are_written_atomically_and_checked(tmp_path):
    path = reference.cache_path(str(tmp_path), "k", "train")
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    reference.save_table(path, table)
    assert sorted(os.listdir(tmp_path)) == ["train-k.npy"]  # no temporary file left behind
    np.testing.assert_array_equal(reference.load_table(path), table)
    assert reference.load_table(str(tmp_path / "missing.npy")) is None
    bad = str(tmp_path / "bad.npy")
    np.save(bad, np.zeros(3))
    with pytest.raises(ValueError, match="delete it"):
        reference.load_table(bad)


def test_attach_looks_up_by_example_and_refuses_missing_rows():
    table = np.array([[-1.0, -2.0], [-3.0, -4.0], [np.nan, np.nan]], np.float32)
    batch = {"example_id": np.array([[1, 0, -1]], np.int32), "kto_label": np.zeros((1, 3), np.int32)}
    out = reference.attach(batch, table, "data.jsonl")
    np.testing.assert_array_equal(out["ref_logps"], [[-3.0, -4.0, -1.0, -2.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"data\.jsonl: no cached reference log-probs for rows \[2\]"):
        reference.attach({**batch, "example_id": np.array([[2, -1, -1]], np.int32)}, table, "data.jsonl")
    # Paired rows read as unpaired units: two table rows per example, told apart by the label.
    units = {"example_id": np.array([[0, 0]], np.int32), "kto_label": np.array([[1, 0]], np.int32)}
    four = np.arange(1, 9, dtype=np.float32).reshape(4, 2)
    out = reference.attach(units, four, "d", units_per_row=2)
    np.testing.assert_array_equal(out["ref_logps"], [[3.0, 4.0, 1.0, 2.0]])
