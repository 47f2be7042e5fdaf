"""Other checkpoint families against transformers, one random checkpoint per pairing made at
test time: logits, greedy and beam tokens and beam scores, generation defaults read from the
checkpoint, and save_pretrained -> transformers with the same logits.

Pairings: DeiT + GPT-2 (DeiT is TrOCR-small's encoder: a ViT with a distillation token),
DeiT + TrOCR shaped like trocr-small, ViT + a sinusoidal TrOCR, ViT + BERT laid out like
manga-ocr."""

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
# TrOCR shaped like trocr-small (widths differ, cross-attention reads the encoder's width,
# learned positions, layernorm_embedding, scale_embedding, relu, untied) and like the
# sinusoidal trocr-large / stage1 models (no layernorm_embedding, gelu, pad 1 inside rows).
TROCR_SMALL = dict(
    model_type="trocr", vocab_size=90, d_model=24, decoder_layers=2, decoder_attention_heads=4,
    decoder_ffn_dim=40, activation_function="relu", max_position_embeddings=24,
    cross_attention_hidden_size=ENC["hidden_size"], scale_embedding=True, layernorm_embedding=True,
    use_learned_position_embeddings=True, tie_word_embeddings=False, pad_token_id=1,
    bos_token_id=0, eos_token_id=2, dropout=0.1,
)  # fmt: skip
TROCR_SINUSOIDAL = dict(
    TROCR_SMALL, d_model=ENC["hidden_size"], activation_function="gelu",
    use_learned_position_embeddings=False, layernorm_embedding=False,
    cross_attention_hidden_size=None, tie_word_embeddings=True,
)  # fmt: skip
# A BertLMHeadModel laid out like manga-ocr-base's decoder (2 layers, tied, pad 0, start
# [CLS] 2, eos [SEP] 3), widths differing from the encoder's (enc_to_dec_proj).
BERT = dict(
    model_type="bert", vocab_size=80, hidden_size=40, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=56, max_position_embeddings=24, pad_token_id=0,
)  # fmt: skip
PAIRINGS = {
    "deit_gpt2": (dict(ENC, model_type="deit"), DEC),
    "deit_trocr_small": (dict(ENC, model_type="deit"), TROCR_SMALL),
    "vit_trocr_sinusoidal": (ENC, TROCR_SINUSOIDAL),
    "vit_bert": (ENC, BERT),
}
TOKENS = {  # the captioner's start and eos, where they are not the decoder's bos / eos
    "deit_gpt2": {},
    "deit_trocr_small": dict(decoder_start_token_id=2),
    "vit_trocr_sinusoidal": dict(decoder_start_token_id=2),
    "vit_bert": dict(decoder_start_token_id=2, eos_token_id=3),
}


def load_reference(path) -> VisionEncoderDecoderModel:
    model = VisionEncoderDecoderModel.from_pretrained(path, attn_implementation="eager").eval()
    if model.config.decoder.model_type == "trocr":
        # transformers 5 loads TrOCR's sinusoid table (a plain attribute, not a buffer) on the
        # meta device: build it as TrOCRDecoder's constructor does.
        positions, cfg = model.decoder.model.decoder.embed_positions, model.config.decoder
        if not cfg.use_learned_position_embeddings:
            rows = cfg.max_position_embeddings + cfg.pad_token_id + 1
            positions.weights = positions.get_embedding(rows, cfg.d_model, cfg.pad_token_id)
    return model


@pytest.fixture(scope="module", params=list(PAIRINGS))
def pairing(request, tmp_path_factory):
    """(encoder dict, decoder dict, transformers model, its folder) of one pairing, its
    generation defaults in config.json (no generation_config.json, as older hub repos)."""
    enc, dec = PAIRINGS[request.param]
    pad = dec.get("pad_token_id", 0)
    ref = build_hf_model(enc, dec, scale=3.0, pad_token_id=pad, **TOKENS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    import json

    config = json.loads((path / "config.json").read_text())
    config.update(num_beams=3, max_length=9, length_penalty=2.0)
    if request.param == "vit_bert":  # manga-ocr's settings, in its config.json
        config.update(no_repeat_ngram_size=3, early_stopping=True)
    (path / "config.json").write_text(json.dumps(config))
    ref = load_reference(path)
    return enc, dec, ref, path


def test_logits_and_encoder_states_match_transformers(pairing):
    enc, dec, ref, path = pairing
    pixels, ids, mask = make_inputs(enc, dec)
    ids[0, 2:4] = dec.get("pad_token_id", 0)  # pad tokens inside a row (sinusoidal positions)
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
    _, info = VisionEncoderDecoderModel.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    back = load_reference(tmp_path / "out")
    assert type(back.encoder).__name__ == type(ref.encoder).__name__
    pixels, ids, mask = make_inputs(enc, dec)
    np.testing.assert_array_equal(
        torch_forward(back.eval(), pixels, ids, mask).logits,
        torch_forward(ref, pixels, ids, mask).logits,
    )
