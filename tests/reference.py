"""Reference models built with transformers (imported lazily: the fast tier has no torch)."""

from __future__ import annotations

import numpy as np


def build_hf_model(encoder: dict, decoder: dict, *, seed: int = 0, scale: float = 1.0, **top):
    """A random transformers VisionEncoderDecoderModel (ViT + GPT-2, or the families that
    `encoder["model_type"]` and `decoder["model_type"]` name) in eval mode.

    `scale` multiplies every weight after init so random logits are not near-uniform.
    """
    import torch
    from transformers import (
        AutoConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    encoder, decoder = dict(encoder), dict(decoder)
    enc = AutoConfig.for_model(encoder.pop("model_type", "vit"), **encoder)
    dec = AutoConfig.for_model(
        decoder.pop("model_type", "gpt2"), add_cross_attention=True, is_decoder=True, **decoder
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id = top.pop("decoder_start_token_id", dec.bos_token_id)
    config.pad_token_id = top.pop("pad_token_id", dec.eos_token_id)
    config.eos_token_id = top.pop("eos_token_id", dec.eos_token_id)
    for k, v in top.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config)
    model.config.encoder._attn_implementation = "eager"
    model.config.decoder._attn_implementation = "eager"
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model.eval()


# Six-plus tiny configs covering every flag transformers honours for ViT + GPT-2.
CONFIGS = {
    "proj_gelu": (
        dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        ),
        dict(
            vocab_size=97,
            n_positions=24,
            n_embd=48,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "same_width_no_qkv_bias": (
        dict(
            image_size=48,
            patch_size=16,
            hidden_size=40,
            num_hidden_layers=1,
            num_attention_heads=5,
            intermediate_size=72,
            qkv_bias=False,
            hidden_act="quick_gelu",
        ),
        dict(
            vocab_size=61,
            n_positions=16,
            n_embd=40,
            n_layer=3,
            n_head=2,
            activation_function="relu",
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "attention_scaling_flags": (
        dict(
            image_size=24,
            patch_size=4,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        dict(
            vocab_size=50,
            n_positions=12,
            n_embd=32,
            n_layer=3,
            n_head=4,
            scale_attn_weights=False,
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            bos_token_id=3,
            eos_token_id=4,
        ),
    ),
    "one_channel_eps_silu": (
        dict(
            image_size=30,
            patch_size=6,
            num_channels=1,
            hidden_size=24,
            num_hidden_layers=2,
            num_attention_heads=3,
            intermediate_size=40,
            layer_norm_eps=1e-6,
            hidden_act="silu",
        ),
        dict(
            vocab_size=80,
            n_positions=20,
            n_embd=24,
            n_layer=2,
            n_head=3,
            layer_norm_epsilon=1e-3,
            activation_function="gelu_fast",
            bos_token_id=5,
            eos_token_id=6,
        ),
    ),
    "untied_head_n_inner": (
        dict(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=8,
            intermediate_size=48,
            hidden_act="gelu_pytorch_tanh",
        ),
        dict(
            vocab_size=70,
            n_positions=16,
            n_embd=36,
            n_layer=2,
            n_head=6,
            n_inner=50,
            activation_function="tanh",
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        ),
    ),
    "deep_mish_gelu10": (
        dict(
            image_size=32,
            patch_size=16,
            hidden_size=24,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=24,
            hidden_act="gelu_10",
        ),
        dict(
            vocab_size=40,
            n_positions=10,
            n_embd=16,
            n_layer=4,
            n_head=1,
            activation_function="mish",
            scale_attn_by_inverse_layer_idx=True,
            bos_token_id=7,
            eos_token_id=8,
        ),
    ),
}


def make_inputs(enc: dict, dec: dict, batch=2, t=7, seed=0, height=None, width=None):
    rng = np.random.default_rng(seed)
    h, w = height or enc["image_size"], width or enc["image_size"]
    pixels = rng.standard_normal((batch, h, w, enc.get("num_channels", 3)), dtype=np.float32)
    ids = rng.integers(0, dec["vocab_size"], (batch, t)).astype(np.int32)
    mask = np.ones((batch, t), np.int32)
    mask[-1, t - 2 :] = 0  # right padding, as training batches have
    return pixels, ids, mask


def torch_forward(model, pixels, ids, mask, **kw):
    import torch

    with torch.no_grad():
        return model(
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            decoder_input_ids=torch.from_numpy(ids).long(),
            decoder_attention_mask=torch.from_numpy(mask).long(),
            output_hidden_states=True,
            **kw,
        )


def build_eos_model(boost: float, *, pad_token_id: int = 0, seed: int = 0):
    """A random checkpoint on which EOS is likely, so that beams finish at different steps.

    Random weights rarely emit EOS. A direction u is added to the final LayerNorm's bias (so
    every hidden state carries it) and `boost` * u to EOS's embedding row (the tied LM head),
    which lifts EOS's logit by about 2 * boost; cross-attention outputs are scaled up so that
    different images give different captions.
    """
    import torch

    enc = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    dec = dict(
        vocab_size=60,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = build_hf_model(enc, dec, scale=3.0, seed=seed, pad_token_id=pad_token_id)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(48, generator=gen)
    u /= u.norm()
    with torch.no_grad():
        model.decoder.transformer.ln_f.bias += 2.0 * u
        model.decoder.transformer.wte.weight[2] += boost * u
        for block in model.decoder.transformer.h:
            block.crossattention.c_proj.weight *= 4.0
    return model


def random_train_batches(
    vocab: int, steps: int = 3, batch: int = 8, length: int = 6, image_size: int = 32, seed: int = 0
) -> list[dict]:
    """Random training batches (start token 0, some padding) for step-equality tests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        labels = rng.integers(0, vocab, (batch, length)).astype(np.int32)
        mask = (rng.random((batch, length)) > 0.2).astype(np.int32)
        mask[:, 0] = 1
        ids = np.concatenate([np.zeros((batch, 1), np.int32), labels[:, :-1]], axis=1)
        pixels = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
        out.append(
            dict(
                pixel_values=pixels,
                decoder_input_ids=ids,
                labels=labels,
                decoder_attention_mask=mask,
            )
        )
    return out
