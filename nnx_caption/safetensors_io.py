"""A streaming reader and writer for the safetensors format.

The `safetensors` package memory-maps whole files, so every tensor read stays resident until
the file is closed: loading would peak at parameters + checkpoint. Reading each tensor with
plain file reads keeps the peak at parameters + one tensor, reads bfloat16 (ml_dtypes) without
torch, and lets every error name the file and the key. The format is an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.

The header is checked here (parse_header), at least as strictly as the format's reference
parser: the tests hold the two side by side on every malformed case and on random
corruptions. Validating with the reference's `safe_open` instead would parse each header
twice, and its messages name neither the file nor, for most faults, the key.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from nnx_caption.files import replacing

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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # numpy dtype -> safetensors' name
# The reference parser's limits: header at most 100 MB; every count and offset a u64.
MAX_HEADER_BYTES = 100_000_000
_U64 = 2**64
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
# Every NaN/Inf check reads this many values at a time, so its temporary stays small.
_FINITE_CHUNK = 1 << 16


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as it is; the message says why."""


Entry = tuple[np.dtype, tuple[int, ...], int, int]  # dtype, shape, data begin, data end


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key {twice[0]!r} appears twice in the header")
    return dict(pairs)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (the format's parser refuses it)")


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64  # bool is an int subclass: refused


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise ValueError(f"{what} {text!r} is not valid Unicode") from None
    return text


def parse_header(raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, Entry]]:
    """(metadata, {key: entry}) from a header's bytes, checked at least as strictly as the
    format's reference parser (the Rust `safetensors` crate): UTF-8 JSON; `__metadata__` a
    str -> str object; entries with exactly dtype (a known name), shape and data_offsets
    (non-negative integers); tensors laid out back to back from byte 0 with no gap or
    overlap, their sizes matching their shapes and together filling the data exactly.
    Raises ValueError naming the key."""
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as err:
        raise ValueError(f"header is not UTF-8 ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"header is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError("header nests too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is allowed; [], 0 and "" are not
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"__metadata__ must map strings to strings, got {metadata!r:.200}")
    for key, value in metadata.items():
        _utf8(key, "__metadata__ key")
        _utf8(value, f"__metadata__[{key!r}]")
    entries: dict[str, Entry] = {}
    for key, entry in header.items():
        _utf8(key, "tensor name")
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise ValueError(
                f"header entry for {key!r} must have exactly the fields dtype, shape and "
                f"data_offsets, got {entry!r:.200}"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"tensor {key!r} has unsupported dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
            raise ValueError(
                f"tensor {key!r}: shape {shape!r:.200} is not a list of non-negative integers"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_u64, offsets))):
            raise ValueError(
                f"tensor {key!r}: data_offsets {offsets!r:.200} is not [begin, end] in "
                "non-negative integers"
            )
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {key!r}: offsets {begin}..{end} do not fit shape {shape}")
        entries[key] = (DTYPES[dtype], tuple(shape), begin, end)
    # The format stores tensors back to back: each starts where the one before it ends.
    position, previous = 0, None
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != position:
            where = f"{previous!r} ends" if previous else "the data starts"
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise ValueError(
                f"tensor {key!r} starts at data byte {begin} but {where} at {position}: it "
                f"{problem} (tensors must be stored back to back)"
            )
        position, previous = end, key
    if position != data_size:
        what = "truncated" if position > data_size else "corrupt"
        raise ValueError(
            f"is {what}: its tensors take {position} bytes after the header, the file holds "
            f"{data_size}; download or copy it again"
        )
    return metadata, entries


def check_finite(key: str, array: np.ndarray) -> None:
    """Raises ValueError when a floating tensor holds NaN or Inf, naming the first one."""
    if array.dtype.kind != "f" and array.dtype != DTYPES["BF16"]:
        return
    flat = array.reshape(-1)
    for start in range(0, flat.size, _FINITE_CHUNK):
        finite = np.isfinite(flat[start : start + _FINITE_CHUNK])
        if not finite.all():
            first = start + int(np.argmin(finite))
            count = flat.size - int(np.count_nonzero(np.isfinite(flat)))
            index = tuple(int(i) for i in np.unravel_index(first, array.shape))
            raise ValueError(
                f"tensor {key!r} holds {count} NaN/Inf value(s), the first ({flat[first]}) at "
                f"index {index}"
            )


class NonFiniteError(CheckpointError):
    """A weight tensor holding NaN or Inf."""


class TensorReader:
    """What every weights-file reader shares (safetensors here, PyTorch state dicts in
    torch_pickle): `path`, `metadata`, `entries` by key, dtype_name / shape / read per key,
    the NaN / Inf check on what it reads, and closing as a context manager."""

    path: str

    def _dtype(self, key: str) -> np.dtype:
        raise NotImplementedError

    def dtype_name(self, key: str) -> str:
        return DTYPE_NAMES[self._dtype(key)]

    def _checked(self, key: str, array: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
        """The array read for `key`; NonFiniteError when it holds NaN or Inf, unless allowed."""
        if not allow_nonfinite:
            try:
                check_finite(key, array)
            except ValueError as err:
                raise NonFiniteError(f"{self.path}: {err}") from None
        return array

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsReader(TensorReader):
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
        if n > MAX_HEADER_BYTES:
            self._fail(f"header length {n} exceeds the format's {MAX_HEADER_BYTES}: corrupt")
        if n > size - 8:
            self._fail(f"header length {n} exceeds the file ({size} bytes): truncated or corrupt")
        try:
            self.metadata, self.entries = parse_header(self._file.read(n), size - 8 - n)
        except ValueError as err:
            self._fail(str(err))
        self._start = 8 + n

    def _fail(self, what: str):
        self._file.close()
        raise CheckpointError(f"{self.path}: {what}")

    def _dtype(self, key: str) -> np.dtype:
        return self.entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str, *, allow_nonfinite: bool = False) -> np.ndarray:
        """The tensor; NonFiniteError when it holds NaN or Inf, unless allowed."""
        dtype, shape, begin, end = self.entries[key]
        out = np.empty(shape, dtype)
        self._file.seek(self._start + begin)
        if self._file.readinto(out.reshape(-1).view(np.uint8)) != end - begin:
            raise CheckpointError(f"{self.path}: short read of tensor {key!r}: file changed?")
        return self._checked(key, out, allow_nonfinite)

    def close(self) -> None:
        self._file.close()


# name, shape, dtype, and a function producing the array when its turn comes.
TensorSpec = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(
    path: str | os.PathLike, tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None
) -> None:
    """Writes tensors one at a time (only one is materialised on the host at once); the file
    appears under `path` when complete, replacing any old one only then."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    with replacing(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, produce in tensors:
            array = np.asarray(produce(), dtype=dtype, order="C")
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {array.shape}, header says {shape}")
            f.write(array.reshape(-1).view(np.uint8).data)
