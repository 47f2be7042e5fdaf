"""Malformed safetensors headers are refused at least as strictly as the format's reference
parser (the `safetensors` package's Rust `safe_open`), each with a CheckpointError naming the
file and the key; NaN/Inf weights are refused unless allowed. Every case starts from
weights/tiny/model.safetensors and is loaded with nc.from_pretrained, as a user would."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import struct

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

import nnx_caption as nc
from nnx_caption.safetensors_io import (
    MAX_HEADER_BYTES,
    NonFiniteError,
    SafetensorsReader,
    write_safetensors,
)

TINY = pathlib.Path(__file__).parents[2] / "weights" / "tiny"
WTE = "decoder.transformer.wte.weight"
WPE = "decoder.transformer.wpe.weight"


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + body


@pytest.fixture(scope="module")
def original() -> tuple[dict, bytes]:
    return _split((TINY / "model.safetensors").read_bytes())


@pytest.fixture
def ckpt(tmp_path) -> pathlib.Path:
    path = tmp_path / "tiny"
    shutil.copytree(TINY, path)
    return path


def _reference_rejects(path: pathlib.Path) -> bool:
    try:
        with safe_open(str(path), "np") as f:
            for key in f.keys():
                f.get_slice(key)  # header checks only: the data is never read
    except SafetensorError:
        return True
    return False


def _neighbours(header: dict) -> tuple[str, str]:
    """Two tensors stored one after the other: (first, second)."""
    order = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return order[0], order[1]


def _shift_onto_neighbour(h):
    _, second = _neighbours(h)
    h[second]["data_offsets"] = [o - 8 for o in h[second]["data_offsets"]]
    return second


def _start_at_zero_like_another(h):
    _, second = _neighbours(h)
    size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
    h[second]["data_offsets"] = [0, size]
    return second


def _negative_offsets(h):
    first, _ = _neighbours(h)
    h[first]["data_offsets"] = [-8, h[first]["data_offsets"][1] - 8]
    return first


def _fractional_shape(h):
    h[WPE]["shape"] = [h[WPE]["shape"][0] + 0.5, h[WPE]["shape"][1]]
    return WPE


def _integral_float_shape(h):
    h[WPE]["shape"] = [float(d) for d in h[WPE]["shape"]]
    return WPE


def _negative_shape(h):
    h[WPE]["shape"] = [-d for d in h[WPE]["shape"]]
    return WPE


def _boolean_shape(h):
    h[WPE]["shape"] = [True, h[WPE]["shape"][0] * h[WPE]["shape"][1]]
    return WPE


def _metadata_not_strings(h):
    h["__metadata__"] = {"format": 1}
    return "__metadata__"


def _metadata_a_list(h):
    h["__metadata__"] = ["pt"]
    return "__metadata__"


def _metadata_an_empty_list(h):
    h["__metadata__"] = []
    return "__metadata__"


def _gap(h):
    _, second = _neighbours(h)
    h[second]["data_offsets"] = [o + 8 for o in h[second]["data_offsets"]]
    return second


def _lowercase_dtype(h):
    h[WPE]["dtype"] = "f32"
    return WPE


def _string_offsets(h):
    h[WPE]["data_offsets"] = [str(o) for o in h[WPE]["data_offsets"]]
    return WPE


def _three_offsets(h):
    h[WPE]["data_offsets"] = [*h[WPE]["data_offsets"], 0]
    return WPE


def _offset_past_u64(h):
    h[WPE]["data_offsets"] = [h[WPE]["data_offsets"][0], 2**64]
    return WPE


HEADER_EDITS = [
    (_shift_onto_neighbour, "overlaps"),
    (_start_at_zero_like_another, "overlaps"),
    (_negative_offsets, "non-negative"),
    (_fractional_shape, "non-negative integers"),
    (_integral_float_shape, "non-negative integers"),
    (_negative_shape, "non-negative integers"),
    (_boolean_shape, "non-negative integers"),
    (_metadata_not_strings, "must map strings to strings"),
    (_metadata_a_list, "must map strings to strings"),
    (_metadata_an_empty_list, "must map strings to strings"),
    (_gap, "gap"),
    (_lowercase_dtype, "unsupported dtype"),
    (_string_offsets, "data_offsets"),
    (_three_offsets, "data_offsets"),
    (_offset_past_u64, "data_offsets"),
]


@pytest.mark.parametrize(
    "edit, needle", HEADER_EDITS, ids=[e.__name__[1:] for e, _ in HEADER_EDITS]
)
def test_malformed_header_is_refused_as_the_reference_refuses_it(ckpt, original, edit, needle):
    header, body = original
    header = json.loads(json.dumps(header))
    key = edit(header)
    path = ckpt / "model.safetensors"
    path.write_bytes(_pack(json.dumps(header).encode(), body))
    assert _reference_rejects(path)
    with pytest.raises(nc.CheckpointError) as err:
        nc.from_pretrained(ckpt)
    message = str(err.value)
    assert str(path) in message and key in message and needle in message, message


def _raw_cases(header: dict, body: bytes) -> dict[str, tuple[bytes, str, str]]:
    """name -> (file bytes, what the message names, what it says)."""
    text = json.dumps(header).encode()
    pad = b" " * (-len(text) % 8)
    deep = b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return {
        "deeply_nested": (_pack(deep, b""), "header", "nests too deeply"),
        "nested_past_the_reference_limit": (
            _pack(b'{"__metadata__":' + b"[" * 200 + b"]" * 200 + b"}", b""),
            "__metadata__",
            "strings to strings",
        ),
        "trailing_bytes": (_pack(text + pad, body + b"\0" * 8), "bytes", "corrupt"),
        "truncated_data": (_pack(text + pad, body[:-8]), "bytes", "truncated"),
        "nul_after_json": (_pack(text + b"\0", body), "header", "not valid JSON"),
        "not_utf8": (
            _pack(text.replace(b'"__metadata__"', b'"__metadata\xff_"'), body),
            "UTF-8",
            "",
        ),
        "nan_literal": (_pack(text.replace(b'"shape": [', b'"shape": [NaN, ', 1), body), "NaN", ""),
        "lone_surrogate": (_pack(text.replace(b'"pt"', b'"\\ud800"'), body), "__metadata__", ""),
        "header_an_array": (_pack(b"[]", b""), "header", "not a JSON object"),
        "header_length_past_the_file": (struct.pack("<Q", 10**6) + text, "header length", ""),
        "header_length_past_the_limit": (
            struct.pack("<Q", MAX_HEADER_BYTES + 1) + text,
            str(MAX_HEADER_BYTES),
            "",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "deeply_nested",
        "nested_past_the_reference_limit",
        "trailing_bytes",
        "truncated_data",
        "nul_after_json",
        "not_utf8",
        "nan_literal",
        "lone_surrogate",
        "header_an_array",
        "header_length_past_the_file",
        "header_length_past_the_limit",
    ],
)
def test_malformed_bytes_are_refused_as_the_reference_refuses_them(ckpt, original, case):
    data, names, says = _raw_cases(*original)[case]
    path = ckpt / "model.safetensors"
    path.write_bytes(data)
    assert _reference_rejects(path)
    with pytest.raises(nc.CheckpointError) as err:
        nc.from_pretrained(ckpt)
    assert str(path) in str(err.value) and names in str(err.value) and says in str(err.value)


def test_where_we_are_stricter_than_the_reference(ckpt, original):
    """Duplicate keys (which copy would win is parser-dependent) and unknown entry fields
    (they could nest without bound) load in the reference; here they are refused."""
    header, body = original
    text = json.dumps(header).encode()
    path = ckpt / "model.safetensors"
    duplicate = text[:-1] + b", " + json.dumps({WPE: header[WPE]}).encode()[1:]
    extra = json.loads(text)
    extra[WPE]["note"] = "x"
    for data, needle in (
        (_pack(duplicate, body), "appears twice"),
        (_pack(json.dumps(extra).encode(), body), "exactly the fields"),
    ):
        path.write_bytes(data)
        assert not _reference_rejects(path)
        with pytest.raises(nc.CheckpointError, match=needle):
            nc.from_pretrained(ckpt)


def test_random_corruptions_that_the_reference_refuses_are_refused(tmp_path, original):
    """1,500 headers with up to three bytes changed (JSON punctuation, digits, any byte): every
    one the reference refuses, ours refuses; every one it accepts reads the same tensors."""
    header, body = original
    size = header[WPE]["data_offsets"][1] - header[WPE]["data_offsets"][0]
    one = {"__metadata__": {"format": "pt"}, WPE: {**header[WPE], "data_offsets": [0, size]}}
    text = json.dumps(one).encode()
    start = header[WPE]["data_offsets"][0]
    data = body[start : start + size]
    rng = random.Random(0)
    path = tmp_path / "x.safetensors"
    accepted = 0
    for _ in range(1500):
        mutated = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(mutated))
            choice = rng.choice(b'0123456789[]{},:"-.eE \\')
            mutated[pos] = rng.randrange(256) if rng.random() < 0.3 else choice
        path.write_bytes(_pack(bytes(mutated), data))
        refused = _reference_rejects(path)
        try:
            with SafetensorsReader(path) as reader:
                ours = {k: reader.read(k, allow_nonfinite=True) for k in reader.entries}
        except nc.CheckpointError:
            continue
        assert not refused, bytes(mutated)
        with safe_open(str(path), "np") as f:
            assert sorted(ours) == sorted(f.keys())
            for k in ours:
                np.testing.assert_array_equal(ours[k], f.get_tensor(k))
        accepted += 1
    assert accepted > 0  # some mutations (e.g. inside "pt") keep the file valid


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_is_refused_unless_allowed(ckpt, value):
    path = ckpt / "model.safetensors"
    _rewrite(path, lambda tensors: tensors[WPE].__setitem__((3, 5), value))
    with pytest.raises(NonFiniteError) as err:
        nc.from_pretrained(ckpt)
    message = str(err.value)
    assert str(path) in message and repr(WPE) in message and "(3, 5)" in message, message
    assert "allow_nonfinite=True" in message
    model = nc.from_pretrained(ckpt, allow_nonfinite=True)
    loaded = np.asarray(model.decoder.wpe[...])
    assert loaded[3, 5] == value if not np.isnan(value) else np.isnan(loaded[3, 5])
    assert np.isfinite(np.delete(loaded.reshape(-1), 3 * loaded.shape[1] + 5)).all()


def _rewrite(path: pathlib.Path, edit) -> None:
    """Reads every tensor of a file, applies edit(tensors), writes it back with its metadata."""
    with SafetensorsReader(path) as reader:
        tensors = {k: reader.read(k) for k in reader.entries}
        metadata = reader.metadata
    edit(tensors)
    specs = [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(path, specs, metadata)


def test_converted_layout_gets_the_same_header_checks(ckpt, tmp_path):
    nc.save_pretrained(nc.from_pretrained(ckpt), tmp_path / "nnx", layout="nnx")
    path = tmp_path / "nnx" / "nnx_model.safetensors"
    header, body = _split(path.read_bytes())
    key = _shift_onto_neighbour(header)
    path.write_bytes(_pack(json.dumps(header).encode(), body))
    assert _reference_rejects(path)
    with pytest.raises(nc.CheckpointError, match="overlaps") as err:
        nc.from_pretrained(tmp_path / "nnx")
    assert str(path) in str(err.value) and repr(key) in str(err.value)
