"""A reader for PyTorch `pytorch_model.bin` state dicts that never runs pickle's code.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the state dict whose tensors
point at raw storages, `<name>/data/<key>`, by persistent ids. A pickle is a program: any
global it names is imported and called. This unpickler admits only what a state dict holds
(an ordered dict, tensor and parameter rebuild records, the typed storage classes), as torch's
`weights_only` loader restricts it, and refuses anything else before it can run, naming the
global it asked for. Tensors are views of their storages, read with numpy, one storage at a
time; torch is never imported. The reader has SafetensorsReader's interface, so loading
streams either format the same way.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from nnx_caption.safetensors_io import CheckpointError, TensorReader

# torch's typed storage classes, as `torch.save` names them, and their element types.
STORAGES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    key: str  # its file in the archive: <name>/data/<key>
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class Refused(CheckpointError):
    """A pickle that asks for more than a state dict holds; nothing of it was executed."""


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise Refused(f"a tensor's {what} is {value!r}, not a tuple of non-negative ints")
    return value


def _rebuild_tensor(storage, offset, shape, stride, *_ignored) -> _Tensor:
    """torch._utils._rebuild_tensor_v2's record, checked: (storage, offset, size, stride,
    requires_grad, backward_hooks[, metadata])."""
    if not isinstance(storage, _Storage) or type(offset) is not int or offset < 0:
        raise Refused(f"a tensor rebuilt from {storage!r} at offset {offset!r}")
    shape, stride = _ints(shape, "size"), _ints(stride, "stride")
    if len(shape) != len(stride):
        raise Refused(f"a tensor of size {shape} with stride {stride}")
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if all(shape) and last >= storage.numel:
        raise Refused(f"a tensor of size {shape} reaches past its storage of {storage.numel}")
    return _Tensor(storage, offset, shape, stride)


def _rebuild_parameter(data, *_ignored) -> _Tensor:
    """torch._utils._rebuild_parameter: (data, requires_grad, backward_hooks)."""
    if not isinstance(data, _Tensor):
        raise Refused(f"a parameter rebuilt from {type(data).__name__}")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGES.items()},
}


class _StateDictUnpickler(pickle._Unpickler):
    """pickle's own Python unpickler with every way to reach code closed: globals come only
    from _ALLOWED; persistent ids only name storages; BUILD only sets an ordered dict's
    attributes (a state dict's `_metadata`)."""

    def __init__(self, file, storage_keys: set[str]):
        super().__init__(file)
        self.storage_keys = storage_keys
        self.dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _StateDictUnpickler._build}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise Refused(
                f"the pickle asks for {module}.{name}, which a state dict never holds; it was "
                "refused before anything of it ran"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Refused(f"persistent id {pid!r} is not a storage record")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or key not in self.storage_keys:
            raise Refused(f"storage record {pid!r} names no storage of the archive")
        if type(numel) is not int or numel < 0:
            raise Refused(f"storage {key!r} has {numel!r} elements")
        return _Storage(key, kind.dtype, numel)

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict or not isinstance(state, dict):
            raise Refused(f"the pickle sets the state of {type(inst).__name__}")
        inst.__dict__.update(state)


class TorchPickleReader(TensorReader):
    """Reads tensors one at a time from a `torch.save` zip archive of a state dict."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.metadata: dict[str, str] = {}
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(
                f"{self.path}: not a zip archive: the legacy torch.save format (PyTorch before "
                "1.6) and other pickles are not read. Re-save it where you trust it, with "
                "`torch.save(torch.load(src, weights_only=True), dst)` or as safetensors"
            )
        self._zip = zipfile.ZipFile(self.path)
        pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            self._fail("holds no single <name>/data.pkl: not a torch.save archive")
        self._root = pickles[0].removesuffix("data.pkl")
        order = self._read_text("byteorder", "little")
        if order != "little":
            self._fail(f"byteorder is {order!r}: only little-endian archives are read")
        data = self._root + "data/"
        keys = {n.removeprefix(data) for n in self._zip.namelist() if n.startswith(data)}
        try:
            with self._zip.open(pickles[0]) as f:
                state = _StateDictUnpickler(io.BytesIO(f.read()), keys).load()
        except Refused as err:
            self._fail(str(err))
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
            self._fail(f"cannot read its pickle: {err}")
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()
        ):
            self._fail("does not hold a state dict (names to tensors)")
        self.entries: dict[str, _Tensor] = dict(state)

    def _read_text(self, name: str, default: str) -> str:
        try:
            return self._zip.read(self._root + name).decode().strip()
        except KeyError:
            return default

    def _fail(self, what: str):
        self._zip.close()
        raise CheckpointError(f"{self.path}: {what}")

    def _dtype(self, key: str) -> np.dtype:
        return self.entries[key].storage.dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def read(self, key: str, *, allow_nonfinite: bool = False) -> np.ndarray:
        """The tensor, copied out of its storage; NonFiniteError when it holds NaN or Inf,
        unless allowed."""
        t = self.entries[key]
        raw = self._zip.read(self._root + "data/" + t.storage.key)
        if len(raw) != t.storage.numel * t.storage.dtype.itemsize:
            raise CheckpointError(
                f"{self.path}: storage of tensor {key!r} holds {len(raw)} bytes, not "
                f"{t.storage.numel} x {t.storage.dtype}: truncated or corrupt"
            )
        storage = np.frombuffer(raw, t.storage.dtype)
        size = t.storage.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            storage[t.offset :], t.shape, [s * size for s in t.stride], writeable=False
        ).copy()
        return self._checked(key, out, allow_nonfinite)

    def close(self) -> None:
        self._zip.close()
