"""Round trips: HF -> nnx-caption -> save_pretrained -> transformers, and the converted layout."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import CONFIGS, make_inputs, torch_forward
from transformers import VisionEncoderDecoderModel

import nnx_caption as nc
from nnx_caption.cli import main as cli


@pytest.mark.parametrize("name", ["proj_gelu", "untied_head_n_inner", "attention_scaling_flags"])
def test_save_pretrained_loads_in_transformers_with_identical_logits(name, hf_checkpoint, tmp_path):
    enc, dec = CONFIGS[name]
    ref_model, path = hf_checkpoint(enc, dec, scale=3.0)
    nc.save_pretrained(nc.from_pretrained(path), tmp_path / "out")

    back, info = VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    back.eval()
    want = ref_model.state_dict()
    got = back.state_dict()
    for key, value in want.items():
        if "pooler" in key:  # unused by VisionEncoderDecoder; exported as zeros
            torch.testing.assert_close(got[key], torch.zeros_like(value), msg=key)
            continue
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    tied = back.decoder.lm_head.weight.data_ptr() == back.decoder.transformer.wte.weight.data_ptr()
    assert tied == dec.get("tie_word_embeddings", True)

    pixels, ids, mask = make_inputs(enc, dec)
    np.testing.assert_array_equal(
        torch_forward(back, pixels, ids, mask).logits,
        torch_forward(ref_model, pixels, ids, mask).logits,
    )


def test_cli_convert_then_export_round_trip(hf_checkpoint, tmp_path):
    enc, dec = CONFIGS["proj_gelu"]
    ref_model, path = hf_checkpoint(enc, dec, scale=3.0)
    (path / "preprocessor_config.json").write_text('{"do_resize": true, "size": 32}')
    assert cli(["convert", str(path), str(tmp_path / "nnx")]) == 0
    assert (tmp_path / "nnx" / "nnx_model.safetensors").exists()
    assert (tmp_path / "nnx" / "preprocessor_config.json").exists()
    assert cli(["export", str(tmp_path / "nnx"), str(tmp_path / "hf")]) == 0

    pixels, ids, mask = make_inputs(enc, dec)
    ours = nc.from_pretrained(path)(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    converted = nc.from_pretrained(tmp_path / "nnx")
    np.testing.assert_array_equal(
        converted(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)), ours
    )
    back = VisionEncoderDecoderModel.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    back.eval()
    np.testing.assert_array_equal(
        torch_forward(back, pixels, ids, mask).logits,
        torch_forward(ref_model, pixels, ids, mask).logits,
    )


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    assert cli(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_transformers_sharded_and_bf16_checkpoints_load(hf_checkpoint):
    enc, dec = CONFIGS["proj_gelu"]
    ref_model, path = hf_checkpoint(
        enc, dec, name="sharded", save_kwargs={"max_shard_size": "20KB"}
    )
    assert (path / "model.safetensors.index.json").exists()
    pixels, ids, mask = make_inputs(enc, dec)
    logits = nc.from_pretrained(path)(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(
        logits, torch_forward(ref_model, pixels, ids, mask).logits, atol=1e-4
    )

    half = ref_model.to(torch.bfloat16)
    half.save_pretrained(path.parent / "bf16")
    model = nc.from_pretrained(path.parent / "bf16")
    np.testing.assert_array_equal(
        model.decoder.wte[...], half.decoder.transformer.wte.weight.detach().float().numpy()
    )
