"""Reading and writing the safetensors format with numpy memory maps.

Our own few lines instead of `safetensors.numpy` because we need bf16 (via ml_dtypes), zero-copy
memory maps from which each device's shard is sliced, and streaming writes, one shard at a time.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read."""


class SafetensorsFile:
    """Lazy view of one .safetensors file: `file[name]` is a read-only memory-mapped array."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + n
        self._entries = header
        self._mmap: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        code = entry["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._start + begin : self._start + end]
        return raw.view(DTYPES[code]).reshape(entry["shape"])


def write(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> int:
    """Writes (name, array) pairs; returns the bytes of tensor data written."""
    tensors = [(name, np.ascontiguousarray(arr)) for name, arr in tensors]
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in CODES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {
            "dtype": CODES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(arr.tobytes())
    return offset
