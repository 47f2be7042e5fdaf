"""weights/tiny against the outputs transformers produced for it (golden.npz), without torch."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import nnx_caption as nc


@pytest.fixture(scope="module")
def golden(tiny_dir):
    return np.load(tiny_dir / "golden.npz")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return nc.from_pretrained(tiny_dir)


def test_logits_and_encoder_match_transformers(model, golden):
    states = model.encoder(jnp.asarray(golden["pixel_values"]))
    np.testing.assert_allclose(states, golden["encoder_hidden"], atol=1e-4)
    logits = model(
        jnp.asarray(golden["pixel_values"]),
        jnp.asarray(golden["decoder_input_ids"]),
        jnp.asarray(golden["decoder_attention_mask"]),
    )
    np.testing.assert_allclose(logits, golden["logits"], atol=1e-4, rtol=0)


def test_config_and_generation_defaults(model, tiny_dir):
    cfg = model.config
    assert cfg.needs_enc_to_dec_proj and cfg.decoder.tie_word_embeddings
    assert (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id) == (335, 335, 335)
    assert cfg.generation.max_length == 16


def test_processor_and_tokenizer_match_transformers(tiny_dir, golden):
    from PIL import Image

    proc = nc.ImageProcessor.from_pretrained(tiny_dir)
    pixels = proc(Image.open(tiny_dir / "sample.png"))
    np.testing.assert_allclose(pixels, golden["sample_pixel_values"], atol=1e-5)
    tok = nc.Tokenizer.from_pretrained(tiny_dir)
    rows = zip(golden["texts"], golden["text_ids"], golden["text_lengths"], strict=True)
    for text, ids, n in rows:
        assert tok.encode(str(text)) == ids[:n].tolist()
        assert tok.decode(ids[:n].tolist()) == str(text)


def test_package_never_imports_torch_or_transformers(tiny_dir):
    code = (
        "import sys, nnx_caption as nc; nc.from_pretrained(sys.argv[1]); "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_dir)], check=True)


def test_generate_matches_transformers(model, golden):
    pixels = jnp.asarray(golden["pixel_values"])
    greedy = nc.generate(model, pixels, max_length=int(golden["greedy_max_length"]))
    np.testing.assert_array_equal(greedy.sequences, golden["greedy_sequences"])
    beam = nc.generate(
        model,
        pixels,
        max_length=12,
        num_beams=int(golden["beam_num_beams"]),
        num_return_sequences=int(golden["beam_num_return_sequences"]),
        length_penalty=1.0,
        early_stopping=False,
    )
    np.testing.assert_array_equal(beam.sequences, golden["beam_sequences"])
    np.testing.assert_allclose(beam.scores, golden["beam_scores"], atol=1e-4)
