"""pytorch_model.bin, as torch.save writes it, loads through the restricted unpickler to the
same model as model.safetensors of the same weights: from a folder, sharded with its index,
and as one part of a composed captioner."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import torch
from reference import CONFIGS, make_inputs
from safetensors.torch import load_file

import nnx_caption as nc
from nnx_caption.torch_pickle import TorchPickleReader


def _state_dict(path) -> dict[str, torch.Tensor]:
    """The folder's model.safetensors as torch tensors, which it then no longer holds: a
    hub .bin has the names transformers saves, not those of v5's modules in memory."""
    state = load_file(path / "model.safetensors")
    os.remove(path / "model.safetensors")
    return state


def test_a_bin_state_dict_loads_as_its_safetensors_do(hf_checkpoint, tmp_path):
    enc, dec = CONFIGS["untied_head_n_inner"]
    _, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    want = nc.from_pretrained(path)(pixels, ids, mask)
    torch.save(_state_dict(path), path / "pytorch_model.bin")
    np.testing.assert_array_equal(nc.from_pretrained(path)(pixels, ids, mask), want)


def test_every_dtype_and_view_reads_as_torch_holds_it(tmp_path):
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    tensors = {
        "float": torch.randn(3, 4),
        "bfloat16": torch.randn(3, 4).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "double": torch.randn(2).double(),
        "long": torch.arange(5),
        "strided": base[1:, ::3],  # a view into a shared storage, offset and strided
        "transposed": base.t(),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "scalar": torch.tensor(1.5),
    }
    torch.save(tensors, tmp_path / "w.bin")
    with TorchPickleReader(tmp_path / "w.bin") as reader:
        assert set(reader.entries) == set(tensors)
        for key, tensor in tensors.items():
            got = reader.read(key)
            want = tensor.detach()
            assert reader.shape(key) == tuple(want.shape), key
            np.testing.assert_array_equal(got.astype(np.float64), want.double().numpy(), key)


def test_a_sharded_bin_checkpoint_loads_by_its_index(hf_checkpoint):
    enc, dec = CONFIGS["proj_gelu"]
    _, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    want = nc.from_pretrained(path)(pixels, ids, mask)
    state = _state_dict(path)
    keys = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(nc.from_pretrained(path)(pixels, ids, mask), want)


def test_a_hub_repo_with_only_a_bin_resolves_from_the_cache(hf_checkpoint, tmp_path, monkeypatch):
    """A repo id whose snapshot holds pytorch_model.bin and no safetensors (manga-ocr-base's
    layout), through huggingface_hub's real cache (no network here)."""
    import shutil

    enc, dec = CONFIGS["proj_gelu"]
    _, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    want = nc.from_pretrained(path)(pixels, ids, mask)
    torch.save(_state_dict(path), path / "pytorch_model.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--someorg--bin-only"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = nc.from_pretrained("someorg/bin-only", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(model(pixels, ids, mask), want)


def test_a_manga_ocr_style_bin_loads(hf_checkpoint, tmp_path):
    """ViT + BERT as manga-ocr-base ships it: pytorch_model.bin only, with the position_ids
    buffer and the tied projection and its bias stored again under cls.predictions.decoder."""
    from parity.test_families import BERT

    enc, _ = CONFIGS["proj_gelu"]
    dec = dict(BERT, bos_token_id=2, eos_token_id=3)
    _, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    want = nc.from_pretrained(path)(pixels, ids, mask)
    state = _state_dict(path)
    state["decoder.bert.embeddings.position_ids"] = torch.arange(dec["max_position_embeddings"])[
        None
    ]
    state["decoder.cls.predictions.decoder.weight"] = state[
        "decoder.bert.embeddings.word_embeddings.weight"
    ]
    state["decoder.cls.predictions.decoder.bias"] = state["decoder.cls.predictions.bias"]
    torch.save(state, path / "pytorch_model.bin")
    np.testing.assert_array_equal(nc.from_pretrained(path)(pixels, ids, mask), want)
