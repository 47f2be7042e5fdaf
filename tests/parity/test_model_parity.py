"""Logits parity with transformers (PyTorch, fp32) on random checkpoints made at test time."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import CONFIGS, build_hf_model, make_inputs, torch_forward

import nnx_caption as nc


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_part_match_transformers(name, hf_checkpoint):
    enc, dec = CONFIGS[name]
    ref_model, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, ids, mask = make_inputs(enc, dec)
    ref = torch_forward(ref_model, pixels, ids, mask)
    model = nc.from_pretrained(path)

    # Encoder, part by part: embeddings, each block, final LayerNorm.
    x = model.encoder.embeddings(jnp.asarray(pixels))
    np.testing.assert_allclose(x, ref.encoder_hidden_states[0], atol=1e-5, err_msg="embeddings")
    for i, block in enumerate(model.encoder.blocks):
        x = block(x, None)
        np.testing.assert_allclose(
            x, ref.encoder_hidden_states[i + 1], atol=1e-4, err_msg=f"encoder block {i}"
        )
    np.testing.assert_allclose(
        model.encoder.ln_f(x), ref.encoder_last_hidden_state, atol=1e-4, err_msg="encoder output"
    )

    # Decoder, part by part: embeddings, each block (the last one after ln_f, as HF reports).
    states = model.encode(jnp.asarray(pixels))
    dec_m = model.decoder
    h = jnp.take(dec_m.wte[...], ids, axis=0) + dec_m.wpe[...][: ids.shape[1]]
    np.testing.assert_allclose(
        h, ref.decoder_hidden_states[0], atol=1e-5, err_msg="decoder embeddings"
    )
    t = ids.shape[1]
    attend = jnp.tril(jnp.ones((t, t), bool))[None, None] & (mask > 0)[:, None, None, :]
    for i, block in enumerate(dec_m.blocks):
        _, h = block(h, i, dec_m.cross_kv(states)[i], attend, None)
        out = dec_m.ln_f(h) if i == len(dec_m.blocks) - 1 else h
        np.testing.assert_allclose(
            out, ref.decoder_hidden_states[i + 1], atol=1e-4, err_msg=f"decoder block {i}"
        )

    logits = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == ref.logits.shape
    np.testing.assert_allclose(logits, ref.logits, atol=1e-4, rtol=0)


def test_position_interpolation_for_other_image_sizes(hf_checkpoint):
    """Non-square and larger images: bicubic position interpolation as transformers does it."""
    enc, dec = CONFIGS["proj_gelu"]
    ref_model, path = hf_checkpoint(enc, dec, scale=3.0)
    model = nc.from_pretrained(path)
    for height, width in ((48, 40), (64, 64), (24, 32)):
        pixels, ids, mask = make_inputs(enc, dec, height=height, width=width)
        ref = torch_forward(ref_model, pixels, ids, mask, interpolate_pos_encoding=True)
        np.testing.assert_allclose(
            model.encoder(jnp.asarray(pixels)),
            ref.encoder_last_hidden_state,
            atol=1e-4,
            err_msg=f"{height}x{width}",
        )
        logits = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
        np.testing.assert_allclose(logits, ref.logits, atol=1e-4, err_msg=f"{height}x{width}")


def test_bicubic_matrix_equals_torch_interpolate():
    from nnx_caption.vit import bicubic_matrix

    rng = np.random.default_rng(0)
    for n_in, n_out in ((14, 20), (14, 7), (3, 5), (5, 5), (1, 4), (4, 1)):
        x = rng.standard_normal((n_in, n_in)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None, None],
            size=(n_out, n_out),
            mode="bicubic",
            align_corners=False,
        )[0, 0].numpy()
        m = bicubic_matrix(n_in, n_out)
        np.testing.assert_allclose(m @ x @ m.T, ref, atol=1e-5, err_msg=f"{n_in}->{n_out}")


def test_full_size_vit_b16_gpt2_small(tmp_path):
    """ViT-B/16 at 224 + GPT-2 small (the nlpconnect shape): logits within 1e-3."""
    base = nc.CaptionConfig()
    enc = dict(image_size=224, patch_size=16)  # transformers' ViTConfig defaults are ViT-B/16
    dec = dict(bos_token_id=50256, eos_token_id=50256)
    ref_model = build_hf_model(enc, dec)
    n_params = sum(p.numel() for n, p in ref_model.named_parameters() if "pooler" not in n)
    ref_model.save_pretrained(tmp_path)
    pixels, ids, mask = make_inputs(
        dict(enc, num_channels=3), dict(dec, vocab_size=50257), batch=1, t=6
    )
    ref = torch_forward(ref_model, pixels, ids, mask)
    model = nc.from_pretrained(tmp_path)
    assert model.config == base
    logits = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(logits, ref.logits, atol=1e-3, rtol=0)
    ours = sum(p.size for p in jax_leaves(model))
    assert ours == n_params  # the tied head is one array, the pooler is not built


def jax_leaves(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("name", ["proj_gelu", "same_width_no_qkv_bias"])
def test_images_with_several_captions_match_repeated_images(name, hf_checkpoint):
    """Two images with three captions each, image-major, each image encoded once and shared by
    its captions' cross-attention: transformers' logits for the images repeated per caption."""
    enc, dec = CONFIGS[name]
    ref_model, path = hf_checkpoint(enc, dec, scale=3.0)
    pixels, _, _ = make_inputs(enc, dec, batch=2)
    _, ids, mask = make_inputs(enc, dec, batch=6, seed=1)
    ref = torch_forward(ref_model, np.repeat(pixels, 3, axis=0), ids, mask)
    model = nc.from_pretrained(path)
    logits = model(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape[0] == 6
    np.testing.assert_allclose(logits, ref.logits, atol=1e-4)
    with pytest.raises(ValueError, match="4 captions do not split evenly over 3 images"):
        model(jnp.asarray(np.repeat(pixels, 2, 0)[:3]), jnp.asarray(ids[:4]))


def test_bf16_compute_stays_close(hf_checkpoint):
    """The compute-dtype option: bf16 matmuls, fp32 master weights, logits near fp32."""
    enc, dec = CONFIGS["proj_gelu"]
    _, path = hf_checkpoint(enc, dec)
    pixels, ids, mask = make_inputs(enc, dec)
    fp32 = nc.from_pretrained(path)
    bf16 = nc.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax_leaves(bf16))
    a = fp32(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    b = bf16(jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask))
    assert b.dtype == jnp.float32  # logits leave the bf16 matmul in its float32 accumulator
    np.testing.assert_allclose(np.asarray(b, np.float32), a, atol=0.1)
    assert not np.array_equal(np.asarray(b, np.float32), np.asarray(a))


def test_dropout_only_in_training(hf_checkpoint):
    from flax import nnx

    enc, dec = CONFIGS["proj_gelu"]  # hidden and attention dropout 0.1, GPT-2's 0.1 defaults
    ref_model, path = hf_checkpoint(enc, dec)
    model = nc.from_pretrained(path)
    pixels, ids, mask = (jnp.asarray(a) for a in make_inputs(enc, dec))
    eval_a, eval_b = model(pixels, ids, mask), model(pixels, ids, mask)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model(pixels, ids, mask, rngs=nnx.Rngs(dropout=0))
    train_b = model(pixels, ids, mask, rngs=nnx.Rngs(dropout=1))
    assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-3
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-3
