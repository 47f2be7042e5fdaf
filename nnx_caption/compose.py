"""A captioner composed from a pretrained ViT or DeiT and a pretrained GPT-2: Hugging Face's
create-model step (VisionEncoderDecoderModel.from_encoder_decoder_pretrained)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import (
    ENCODER_CONFIGS,
    CaptionConfig,
    ConfigError,
    GPT2Config,
    pick_fields,
    read_json,
)
from nnx_caption.hub import resolve, weight_files
from nnx_caption.loading import Loader, abstract_model, initial_values, log_report
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.weight_table import decoder_name, encoder_name

# What transformers' from_encoder_decoder_pretrained adds: cross-attention in every block, and
# the width projection when the widths differ.
COMPOSED_NEW = (r"decoder\.blocks\.\d+\.(ln_cross|cross)\..*", r"enc_to_dec_proj\..*")


def _part_config(directory: str, model_types: Iterable[str], role: str) -> dict:
    hf = read_json(os.path.join(directory, "config.json"))
    if hf.get("model_type") not in model_types:
        raise ConfigError(
            f"{directory}/config.json: model_type is {hf.get('model_type')!r}; the {role} must "
            f"be a {' or '.join(map(repr, model_types))} checkpoint"
        )
    return hf


def from_encoder_decoder_pretrained(
    encoder: str | os.PathLike,
    decoder: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> VisionEncoderDecoder:
    """A captioner from a pretrained ViT or DeiT (ViTModel, DeiTModel or their image
    classifiers' layouts) and a pretrained GPT-2 (GPT2LMHeadModel or GPT2Model layout), local
    folders or hub ids, as transformers' VisionEncoderDecoderModel.from_encoder_decoder_pretrained
    composes it: every block's cross-attention (and enc_to_dec_proj when the widths differ) is
    new, initialised from `seed` as transformers initialises it; the loaded parts are the
    sources' tensors. Token ids as HF's captioning example sets them: decoder_start = the
    decoder's bos, pad = eos = its eos."""
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    enc_dir, dec_dir = resolve(encoder, **hub), resolve(decoder, **hub)
    enc = _part_config(enc_dir, ENCODER_CONFIGS, "encoder")
    dec = _part_config(dec_dir, ["gpt2"], "decoder")
    decoder_cfg = pick_fields(GPT2Config, dec, "decoder")
    if decoder_cfg.bos_token_id is None or decoder_cfg.eos_token_id is None:
        raise ConfigError(f"{dec_dir}/config.json: bos_token_id and eos_token_id must be set")
    config = CaptionConfig(
        encoder=pick_fields(ENCODER_CONFIGS[enc["model_type"]], enc, "encoder"),
        decoder=decoder_cfg,
        decoder_start_token_id=decoder_cfg.bos_token_id,
        pad_token_id=decoder_cfg.eos_token_id,
        eos_token_id=decoder_cfg.eos_token_id,
    )
    config.validate()
    graphdef, variables, state = abstract_model(config, dtype, param_dtype)
    new = COMPOSED_NEW if config.needs_enc_to_dec_proj else COMPOSED_NEW[:1]
    init = initial_values(VisionEncoderDecoder, config, dtype, param_dtype, seed, variables)
    loader = Loader(config, variables, new_params=new, init=init, allow_nonfinite=allow_nonfinite)
    encoder_type = enc["model_type"]
    for directory, rename, role in (
        (enc_dir, lambda key: encoder_name(key, encoder_type), encoder_type),
        (dec_dir, decoder_name, "GPT-2"),
    ):
        layout, files = weight_files(directory)
        if layout != "hf":
            raise CheckpointError(f"{files[0]}: the {role} must be a Hugging Face checkpoint")
        for file in files:
            loader.read(file, "hf", rename, hint=f" (not a {role} checkpoint?)")
    where = f"{enc_dir} + {dec_dir}"
    log_report(where, loader.finish(where))
    return nnx.merge(graphdef, state)
