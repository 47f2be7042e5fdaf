"""pytorch_model.bin is read by a restricted unpickler: a pickle asking for anything a state
dict does not hold is refused naming what it asked for, before any of it runs. The pickles here
are written by hand (the fast tier has no torch); tests/parity/test_torch_pickle.py reads what
torch.save writes."""

from __future__ import annotations

import os
import pathlib
import pickle
import zipfile

import pytest

from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.torch_pickle import TorchPickleReader


def _archive(path: pathlib.Path, data_pkl: bytes, storages: dict[str, bytes] = {}) -> pathlib.Path:  # noqa: B006
    """A torch.save-shaped zip: archive/data.pkl, archive/data/<key>, archive/version."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/version", "3\n")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def _refused(path: pathlib.Path, *words: str) -> str:
    with pytest.raises(CheckpointError) as err:
        TorchPickleReader(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    return message


def _mkdir(target: pathlib.Path) -> bytes:
    """A protocol-0 pickle that would call os.mkdir(target)."""
    return f"cos\nmkdir\n(S'{target}'\ntR.".encode()


def test_a_code_running_global_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    message = _refused(
        _archive(tmp_path / "pytorch_model.bin", _mkdir(marker)), "os.mkdir", "before anything"
    )
    assert not marker.exists(), message


@pytest.mark.parametrize(
    "module, name",
    [("builtins", "eval"), ("torch", "load"), ("torch._utils", "_rebuild_qtensor"),
     ("collections", "defaultdict"), ("numpy.core.multiarray", "_reconstruct")],
)  # fmt: skip
def test_other_globals_are_refused_by_name(tmp_path, module, name):
    data = f"c{module}\n{name}\n(tR.".encode()
    _refused(_archive(tmp_path / "w.bin", data), f"{module}.{name}")


def test_a_reduce_nested_in_a_state_dict_is_refused(tmp_path):
    """An allowed OrderedDict whose items hold a call to os.mkdir: refused, nothing ran."""
    marker = tmp_path / "ran"
    call = f"cos\nmkdir\n(S'{marker}'\ntR".encode()
    data = b"ccollections\nOrderedDict\n(((S'w'\n" + call + b"tltR."
    _refused(_archive(tmp_path / "w.bin", data), "os.mkdir")
    assert not marker.exists()


def test_an_allowed_rebuild_fed_something_else_is_refused(tmp_path):
    """_rebuild_tensor_v2 called on an OrderedDict instead of a storage."""
    data = (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        b"(ccollections\nOrderedDict\n)RI0\n(I2\nt(I1\ntI00\nNtR."
    )
    _refused(_archive(tmp_path / "w.bin", data), "a tensor rebuilt from")


def test_setting_state_on_anything_but_a_state_dict_is_refused(tmp_path):
    """BUILD on the OrderedDict class itself would change it for the whole process."""
    data = b"ccollections\nOrderedDict\n(dS'x'\nI1\nsb."
    _refused(_archive(tmp_path / "w.bin", data), "sets the state of")
    import collections

    assert not hasattr(collections.OrderedDict, "x")


def test_a_storage_the_archive_lacks_is_refused(tmp_path):
    pid = b"(S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
    data = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"I0\n(I4\nt(I1\ntI00\nNtR."
    _refused(_archive(tmp_path / "w.bin", data), "names no storage")


def test_a_tensor_past_its_storage_is_refused(tmp_path):
    pid = b"(S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI4\ntQ"
    data = b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"I2\n(I4\nt(I1\ntI00\nNtR."
    _refused(_archive(tmp_path / "w.bin", data, {"0": bytes(16)}), "past its storage")


def test_the_legacy_format_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    _refused(path, "not a zip archive", "legacy torch.save format")


def test_an_archive_without_its_pickle_is_refused(tmp_path):
    path = tmp_path / "w.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3\n")
    _refused(path, "data.pkl")
    assert os.path.exists(path)
