"""A streaming reader and writer for the safetensors format.

The `safetensors` package memory-maps whole files, so every tensor read stays resident until
the file is closed: loading would peak at parameters + checkpoint. Reading each tensor with
plain file reads keeps the peak at parameters + one tensor, reads bfloat16 (ml_dtypes) without
torch, and lets every error name the file and the key. The format is an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

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
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as it is; the message says why."""


class SafetensorsReader:
    """Reads tensors one at a time from a .safetensors file, validating the header first."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as err:
            raise CheckpointError(f"{self.path}: cannot open: {err.strerror}") from None
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            self._fail(f"is truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            self._fail(f"header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._fail(f"header is not valid JSON ({err}): corrupt file")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object: corrupt file")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, entry in header.items():
            try:
                dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                self._fail(f"header entry for {key!r} is malformed: {entry!r}")
            if dtype not in DTYPES:
                self._fail(f"tensor {key!r} has unsupported dtype {dtype}")
            if end - begin != math.prod(shape) * DTYPES[dtype].itemsize or begin > end:
                self._fail(f"tensor {key!r}: offsets {begin}..{end} do not fit shape {shape}")
            if self._start + end > size:
                self._fail(
                    f"is truncated: tensor {key!r} ends at byte {self._start + end}, "
                    f"the file has {size}; download or copy it again"
                )
            self.entries[key] = (DTYPES[dtype], shape, begin, end)

    def _fail(self, what: str):
        self._file.close()
        raise CheckpointError(f"{self.path}: {what}")

    def dtype_name(self, key: str) -> str:
        return _NAMES[self.entries[key][0]]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        out = np.empty(shape, dtype)
        self._file.seek(self._start + begin)
        if self._file.readinto(out.reshape(-1).view(np.uint8)) != end - begin:
            raise CheckpointError(f"{self.path}: short read of tensor {key!r}: file changed?")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# name, shape, dtype, and a function producing the array when its turn comes.
TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(
    path: str | os.PathLike, tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None
) -> None:
    """Writes tensors one at a time (only one is materialised on the host at once); the file
    appears atomically under `path` when complete."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, produce in tensors:
            array = np.asarray(produce(), dtype=dtype, order="C")
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {array.shape}, header says {shape}")
            f.write(array.reshape(-1).view(np.uint8).data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
