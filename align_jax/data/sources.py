"""Random-access row sources: local JSONL / JSON / Parquet files, HF `datasets`, and TFDS.

The pipeline shuffles by index and each host reads only the indices of its share, so every source
offers `len(source)` and `source.read(indices) -> [(raw row or BadRowError, Origin)]`. A row that
cannot even be parsed (a broken JSON line) comes back as its BadRowError rather than raising, so the
caller's `on_bad_row` policy decides. Local files are read with our own readers, not `datasets`: the
Arrow schema inference there fails on the first row of the wrong type with an error that names
neither the file nor the row, which is exactly the error we want to give well.

Source specs (`open_source`):
  "data/train.jsonl", "data/*.parquet", ["a.jsonl", "b.json"]   local files (glob patterns allowed)
  "tfds:NAME/SPLIT"                                            TFDS (needs the `tfds` extra)
  "org/name" or "org/name:SPLIT"                               `datasets.load_dataset` (a hub name or a local
                                                               directory of data files)
  "DIR" or "DIR:SPLIT", DIR written by `save_to_disk`          `datasets.load_from_disk` (SPLIT of a DatasetDict)
  {"path": ..., "split": ..., **kwargs}                        `datasets.load_dataset(**spec)`
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from align_jax.data.formats import BadRowError, Origin
from align_jax.errors import NotFoundError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ReadResult = tuple[Any, Origin]


def iter_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for each JSON object line of a small JSONL file (prompt sets, complements): blank
    lines skipped; a line that is not a JSON object raises ValueError naming the file and line. `where`
    ("PATH line N") is for the caller's own field errors. Training data goes through the sources below."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def load_jsonl_rows(path: str, validate: Callable[[Any, str], Any], limit: int | None = None) -> list[Any]:
    """`validate(row, where)` of each row of a small JSONL prompt file (its first `limit` rows when given),
    which raises naming the file, line and field for a bad row; an empty file is an error too."""
    rows = []
    for where, raw in iter_jsonl(path):
        rows.append(validate(raw, where))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


class RowSource(Protocol):
    name: str

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> list[ReadResult]: ...


class JsonlFile:
    """One JSON object per line. Indexed once by byte offset, so rows are read by seeking and the
    file never has to fit in memory. Blank lines are skipped but still counted in line numbers."""

    def __init__(self, path: str):
        self.name = path
        offsets, lines = [], []
        with open(path, "rb") as f:
            pos = 0
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(line_no)
                pos += len(line)
        self._offsets = np.asarray(offsets, np.int64)
        self._lines = np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, indices: Sequence[int]) -> list[ReadResult]:
        out = []
        with open(self.name, "rb") as f:
            for i in indices:
                origin = Origin(self.name, int(self._lines[i]), "line")
                f.seek(int(self._offsets[i]))
                # surrogateescape keeps invalid UTF-8 as lone surrogates; formats.py then reports the
                # exact field that holds them instead of failing the whole line.
                text = f.readline().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")  # BOM
                try:
                    out.append((json.loads(text), origin))
                except json.JSONDecodeError as e:
                    out.append((BadRowError(origin, None, f"not valid JSON: {e.msg} at column {e.colno}"), origin))
        return out


class JsonFile:
    """A JSON array of row objects (loaded whole: JSON arrays cannot be read piecewise)."""

    def __init__(self, path: str):
        self.name = path
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="surrogateescape")
        # A broken or non-list file has no rows to skip: that is the file's error, not a row's.
        try:
            rows = json.loads(text.lstrip("\ufeff"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json source must hold a list of rows, got {type(rows).__name__}")
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, indices: Sequence[int]) -> list[ReadResult]:
        return [(self._rows[i], Origin(self.name, int(i))) for i in indices]


class ParquetFile:
    """A Parquet file, memory-mapped; rows are converted to Python one at a time."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.name = path
        self._table = pq.read_table(path, memory_map=True)

    def __len__(self) -> int:
        return self._table.num_rows

    def read(self, indices: Sequence[int]) -> list[ReadResult]:
        return [(self._table.slice(int(i), 1).to_pylist()[0], Origin(self.name, int(i))) for i in indices]


class IndexedSource:
    """Anything with `len()` and `[i] -> dict`: a `datasets.Dataset` or a TFDS random-access source."""

    def __init__(self, name: str, rows: Any, decode_bytes: bool = False):
        self.name = name
        self._rows = rows
        self._decode = decode_bytes

    def __len__(self) -> int:
        return len(self._rows)

    def read(self, indices: Sequence[int]) -> list[ReadResult]:
        out = []
        for i in indices:
            row = self._rows[int(i)]
            out.append((_tfds_to_python(row) if self._decode else row, Origin(self.name, int(i))))
        return out


class ConcatSource:
    """Several sources as one index space, in the order given."""

    def __init__(self, sources: Sequence[RowSource]):
        self.sources = list(sources)
        self.name = ", ".join(s.name for s in self.sources)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, indices: Sequence[int]) -> list[ReadResult]:
        # One read() per underlying source (a JSONL file is opened once), results back in input order.
        groups: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"row {i} out of range for {len(self)} rows")
            k = bisect.bisect_right(self._starts, int(i)) - 1
            groups.setdefault(k, []).append((pos, int(i) - self._starts[k]))
        out: list[ReadResult | None] = [None] * len(indices)
        for k, items in groups.items():
            for (pos, _), result in zip(items, self.sources[k].read([j for _, j in items]), strict=True):
                out[pos] = result
        return out  # type: ignore[return-value]


def _tfds_to_python(value: Any) -> Any:
    """TFDS yields numpy scalars/arrays and bytes; formats.py wants lists, dicts and str/bytes."""
    if isinstance(value, Mapping):
        return {k: _tfds_to_python(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_tfds_to_python(v) for v in value.tolist()] if value.ndim else _tfds_to_python(value.item())
    if isinstance(value, list | tuple):
        return [_tfds_to_python(v) for v in value]
    return value


def _open_tfds(spec: str) -> RowSource:
    name_split = spec[len("tfds:") :]
    name, sep, split = name_split.rpartition("/")
    if not sep or not name or not split:
        raise ValueError(f"TFDS source {spec!r}: expected 'tfds:NAME/SPLIT', e.g. 'tfds:my_sft_data/train'")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            f"source {spec!r} needs tensorflow_datasets, which is not installed; install the tfds extra: "
            "pip install 'align_jax[tfds]'"
        ) from None
    try:
        # ArrayRecord-backed datasets give true random access, which shuffling by index needs.
        rows = tfds.data_source(name, split=split)
    except Exception:
        # Older (TFRecord) datasets have no random access: materialise the split once.
        rows = list(tfds.as_numpy(tfds.load(name, split=split)))
    return IndexedSource(spec, rows, decode_bytes=True)


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
    )


def _open_saved(path: str, split: str | None, named: bool) -> RowSource:
    """A directory written by `save_to_disk`: a Dataset, or a DatasetDict read at `split`. `named`: the spec
    said 'DIR:SPLIT' (a split that a split-less Dataset cannot honour, so it is refused rather than ignored)."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None or split not in ds:
            raise ValueError(f"{path} holds splits {sorted(ds)}, not {split!r}: name one as '{path}:SPLIT'")
        return IndexedSource(f"{path}[{split}]", ds[split])
    if named:
        raise ValueError(f"{path} holds one dataset without splits: give it as {path!r}, without ':{split}'")
    return IndexedSource(path, ds)


def _open_datasets(spec: str | Mapping[str, Any], default_split: str | None) -> RowSource:
    import datasets

    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        kwargs.setdefault("split", default_split)
        if kwargs["split"] is None:
            raise ValueError(f"dataset spec {spec!r}: give a 'split'")
        name = f"{kwargs.get('path')}[{kwargs['split']}]"
        return IndexedSource(name, datasets.load_dataset(**kwargs))
    if _is_saved_dataset(spec):
        return _open_saved(spec, default_split, named=False)
    if ":" in spec and not os.path.exists(spec):
        path, split = spec.rsplit(":", 1)
        # load_dataset on a save_to_disk directory would read its Arrow shards as a fresh dataset with made-up
        # splits (or refuse), so a 'DIR:SPLIT' of one goes to load_from_disk.
        if _is_saved_dataset(path):
            return _open_saved(path, split, named=True)
    elif default_split is not None:
        path, split = spec, default_split
    else:
        raise ValueError(f"dataset {spec!r}: name the split, as '{spec}:SPLIT' (e.g. '{spec}:test')")
    return IndexedSource(f"{path}[{split}]", datasets.load_dataset(path, split=split))


def _open_file(path: str) -> RowSource:
    if path.endswith(".jsonl"):
        return JsonlFile(path)
    if path.endswith(".json"):
        return JsonFile(path)
    if path.endswith(".parquet"):
        return ParquetFile(path)
    raise ValueError(f"{path}: unsupported file type; local files must end in one of {FILE_SUFFIXES}")


def _expand(spec: str) -> list[str]:
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise NotFoundError(f"no files match {spec!r}")
        return paths
    if not os.path.exists(spec):
        raise NotFoundError(f"no such file: {spec}")
    return [spec]


def check_local_files(spec: Any, key: str) -> None:
    """Raises NotFoundError naming `config.<key>` when a source spec names local files that are not there
    (datasets names, TFDS and dataset directories are left to their loaders). Runs are checked this way
    before they create their workdir."""
    specs = [spec] if isinstance(spec, str | os.PathLike) else spec if isinstance(spec, list | tuple) else []
    for one in specs:
        one = os.fspath(one)
        if one.endswith(FILE_SUFFIXES) and not one.startswith("tfds:"):
            try:
                _expand(one)
            except NotFoundError as e:
                raise NotFoundError(f"config.{key}: {e}") from None


def open_source(
    spec: str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any], split: str | None = "train"
) -> RowSource:
    """Opens a source spec (see the module docstring). `split` is the `datasets` split used when the
    spec names none; with `split=None` a dataset name must carry its split ('NAME:SPLIT')."""
    if isinstance(spec, Mapping):
        return _open_datasets(spec, split)
    if isinstance(spec, str | os.PathLike):
        spec = os.fspath(spec)
        if spec.startswith("tfds:"):
            return _open_tfds(spec)
        if not spec.endswith(FILE_SUFFIXES):
            return _open_datasets(spec, split)
        paths = _expand(spec)
    else:
        specs = [os.fspath(s) for s in spec]
        if not specs:
            raise ValueError("empty list of data files")
        paths = [p for s in specs for p in _expand(s)]
    sources = [_open_file(p) for p in paths]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)
