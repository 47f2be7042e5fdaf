"""Other checkpoint families against transformers, one random checkpoint per pairing made at
test time: logits, greedy and beam tokens and beam scores, generation defaults read from the
checkpoint, and save_pretrained -> transformers with the same logits.

Pairings: DeiT + GPT-2 (DeiT is TrOCR-small's encoder: a ViT with a distillation token)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import CONFIGS, build_hf_model, make_inputs, torch_forward
from transformers import VisionEncoderDecoderModel

import nnx_caption as nc

# The ViT + GPT-2 shapes of reference.CONFIGS, with each pairing's families.
ENC, DEC = CONFIGS["proj_gelu"]
PAIRINGS = {"deit_gpt2": (dict(ENC, model_type="deit"), DEC)}


@pytest.fixture(scope="module", params=list(PAIRINGS))
def pairing(request, tmp_path_factory):
    """(encoder dict, decoder dict, transformers model, its folder) of one pairing, its
    generation defaults in config.json (no generation_config.json, as older hub repos)."""
    enc, dec = PAIRINGS[request.param]
    ref = build_hf_model(enc, dec, scale=3.0, pad_token_id=0)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    import json

    config = json.loads((path / "config.json").read_text())
    config.update(num_beams=3, max_length=9, length_penalty=2.0)
    (path / "config.json").write_text(json.dumps(config))
    ref = VisionEncoderDecoderModel.from_pretrained(path, attn_implementation="eager").eval()
    return enc, dec, ref, path


def test_logits_and_encoder_states_match_transformers(pairing):
    enc, dec, ref, path = pairing
    pixels, ids, mask = make_inputs(enc, dec)
    want = torch_forward(ref, pixels, ids, mask)
    model = nc.from_pretrained(path)
    states = model.encoder(jnp.asarray(pixels))
    np.testing.assert_allclose(states, want.encoder_last_hidden_state, atol=1e-4, rtol=0)
    logits = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(logits, want.logits, atol=1e-4, rtol=0)


def test_position_embeddings_resize_as_transformers_interpolates(pairing):
    enc, dec, ref, path = pairing
    pixels, ids, mask = make_inputs(enc, dec, height=48, width=40)
    want = torch_forward(ref, pixels, ids, mask, interpolate_pos_encoding=True)
    got = nc.from_pretrained(path)(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got, want.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("settings", [dict(num_beams=1), dict(), dict(num_return_sequences=3)])
def test_generated_tokens_and_beam_scores_match_transformers(pairing, settings):
    """Unset settings come from the checkpoint's config.json (3 beams, max_length 9, length
    penalty 2), as transformers reads them."""
    enc, dec, ref, path = pairing
    pixels = np.random.default_rng(1).standard_normal((3, 32, 32, 3), dtype=np.float32)
    with torch.no_grad():
        out = ref.generate(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            return_dict_in_generate=True,
            output_scores=True,
            **settings,
        )
    got = nc.generate(nc.from_pretrained(path), jnp.asarray(pixels), **settings)
    np.testing.assert_array_equal(got.sequences, out.sequences.numpy())
    assert got.sequences.shape[1] <= 9
    if settings.get("num_beams", 3) > 1:
        np.testing.assert_allclose(got.scores, out.sequences_scores.numpy(), atol=1e-4)


def test_save_pretrained_loads_in_transformers_with_the_same_logits(pairing, tmp_path):
    enc, dec, ref, path = pairing
    nc.save_pretrained(nc.from_pretrained(path), tmp_path / "out")
    back, info = VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(back.encoder).__name__ == type(ref.encoder).__name__
    pixels, ids, mask = make_inputs(enc, dec)
    np.testing.assert_array_equal(
        torch_forward(back.eval(), pixels, ids, mask).logits,
        torch_forward(ref, pixels, ids, mask).logits,
    )
