"""Row sources: line numbers, file-level errors, and spec parsing that fails before touching the network."""

from __future__ import annotations

import json

import pytest

from align_jax.data.formats import BadRowError, Origin
from align_jax.data.sources import ConcatSource, JsonlFile, open_source

ROW = {"prompt": "a", "completion": "b"}


def test_jsonl_skips_blank_lines_but_keeps_line_numbers_and_reads_a_bom(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n\n  \n" + b"{oops\n" + json.dumps(ROW).encode())
    src = open_source(str(path))
    assert isinstance(src, JsonlFile) and len(src) == 3
    (first, o1), (bad, o2), (last, o3) = src.read([0, 1, 2])
    assert first == last == ROW
    assert (o1, o2, o3) == (Origin(str(path), 1, "line"), Origin(str(path), 4, "line"), Origin(str(path), 5, "line"))
    assert isinstance(bad, BadRowError) and "not valid JSON" in str(bad) and bad.row == 4


def test_concatenated_files_read_in_any_index_order(tmp_path):
    for name, n in (("a", 3), ("b", 2)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({**ROW, "i": f"{name}{k}"}) + "\n" for k in range(n))
        )
    src = open_source(str(tmp_path / "*.jsonl"))
    assert isinstance(src, ConcatSource) and len(src) == 5
    got = src.read([4, 0, 3, 2])
    assert [r["i"] for r, _ in got] == ["b1", "a0", "b0", "a2"]
    assert [(o.file.rsplit("/", 1)[1], o.row) for _, o in got] == [
        ("b.jsonl", 2),
        ("a.jsonl", 1),
        ("b.jsonl", 1),
        ("a.jsonl", 3),
    ]
    with pytest.raises(IndexError):
        src.read([5])


def test_file_level_errors_name_the_file(tmp_path):
    broken, not_list, other = tmp_path / "broken.json", tmp_path / "obj.json", tmp_path / "rows.csv"
    broken.write_text("[\n{}\n,,]")
    not_list.write_text(json.dumps(ROW))
    other.write_text("a,b")
    with pytest.raises(ValueError, match=r"broken\.json line 3: not valid JSON"):
        open_source(str(broken))
    with pytest.raises(ValueError, match=r"obj\.json: a \.json source must hold a list"):
        open_source(str(not_list))
    with pytest.raises(ValueError, match="unsupported file type"):
        open_source([str(other)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(str(tmp_path / "missing.jsonl"))


def test_dataset_names_without_a_split_are_refused_for_eval():
    with pytest.raises(ValueError, match=r"'org/chats:SPLIT'"):
        open_source("org/chats", split=None)
    with pytest.raises(ValueError, match="give a 'split'"):
        open_source({"path": "org/chats"}, split=None)
