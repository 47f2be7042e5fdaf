"""A captioner composed from a pretrained ViT or DeiT and a pretrained GPT-2, TrOCR or BERT
decoder: Hugging Face's
create-model step (VisionEncoderDecoderModel.from_encoder_decoder_pretrained)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import (
    DECODER_CONFIGS,
    ENCODER_CONFIGS,
    CaptionConfig,
    ConfigError,
    first_given,
    pick_fields,
    read_json,
)
from nnx_caption.hub import resolve, weight_files
from nnx_caption.loading import Loader, abstract_model, initial_values, log_report
from nnx_caption.model import VisionEncoderDecoder
from nnx_caption.safetensors_io import CheckpointError
from nnx_caption.weight_table import decoder_name, encoder_name

# What transformers' from_encoder_decoder_pretrained adds, by decoder family: cross-attention
# in every block where the source decoder has none (GPT-2, BERT; TrOCRForCausalLM always holds
# it), BERT's MLM head where the source is a bare BertModel (a file holding it wins), and the
# width projection when the widths differ.
CROSS_ATTENTION = r"decoder\.blocks\.\d+\.(ln_cross|cross)\..*"
COMPOSED_NEW = {
    "gpt2": (CROSS_ATTENTION,),
    "trocr": (),
    "bert": (CROSS_ATTENTION, r"decoder\.(head_dense|head_ln|head_bias|lm_head)(\..*)?"),
}
PROJECTION = r"enc_to_dec_proj\..*"


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
    decoder_start_token_id: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
) -> VisionEncoderDecoder:
    """A captioner from a pretrained ViT or DeiT (ViTModel, DeiTModel or their image
    classifiers' layouts) and a pretrained decoder (GPT-2: GPT2LMHeadModel or GPT2Model;
    TrOCRForCausalLM; BERT: BertLMHeadModel, BertForMaskedLM or BertModel), local folders or
    hub ids, as transformers' VisionEncoderDecoderModel.from_encoder_decoder_pretrained composes
    it: what the source decoder lacks (COMPOSED_NEW: cross-attention, a bare BERT's head) and
    enc_to_dec_proj when the widths differ are new, initialised from `seed` as transformers
    initialises them; the loaded parts are the sources' tensors. Token ids, where not given, as
    HF's captioning example sets them for GPT-2: decoder_start = the decoder's bos, eos = its
    eos, pad = its pad, else eos. BERT has neither bos nor eos: pass its [CLS] and [SEP] ids."""
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    enc_dir, dec_dir = resolve(encoder, **hub), resolve(decoder, **hub)
    enc = _part_config(enc_dir, ENCODER_CONFIGS, "encoder")
    dec = _part_config(dec_dir, DECODER_CONFIGS, "decoder")
    family = dec["model_type"]
    decoder_cfg = pick_fields(DECODER_CONFIGS[family], dec, "decoder")
    eos = first_given(eos_token_id, decoder_cfg.eos_token_id)
    start = first_given(decoder_start_token_id, decoder_cfg.bos_token_id)
    if start is None or eos is None:
        raise ConfigError(
            f"{dec_dir}/config.json sets no bos_token_id / eos_token_id: pass "
            "decoder_start_token_id and eos_token_id (CLI: --decoder_start_token_id, "
            "--eos_token_id), e.g. BERT's [CLS] and [SEP] ids"
        )
    # GPT-2 has no pad token: it pads with its eos, as HF's captioning example does.
    pad = first_given(pad_token_id, getattr(decoder_cfg, "pad_token_id", None), eos)
    config = CaptionConfig(
        encoder=pick_fields(ENCODER_CONFIGS[enc["model_type"]], enc, "encoder"),
        decoder=decoder_cfg,
        decoder_start_token_id=start,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    config.validate()
    graphdef, variables, state = abstract_model(config, dtype, param_dtype)
    new = COMPOSED_NEW[family] + ((PROJECTION,) if config.needs_enc_to_dec_proj else ())
    init = initial_values(VisionEncoderDecoder, config, dtype, param_dtype, seed, variables)
    loader = Loader(config, variables, new_params=new, init=init, allow_nonfinite=allow_nonfinite)
    encoder_type = enc["model_type"]
    for directory, rename, role in (
        (enc_dir, lambda key: encoder_name(key, encoder_type), encoder_type),
        (dec_dir, lambda key: decoder_name(key, family), family),
    ):
        layout, files = weight_files(directory)
        if layout != "hf":
            raise CheckpointError(f"{files[0]}: the {role} must be a Hugging Face checkpoint")
        for file in files:
            loader.read(file, "hf", rename, hint=f" (not a {role} checkpoint?)")
    where = f"{enc_dir} + {dec_dir}"
    log_report(where, loader.finish(where))
    return nnx.merge(graphdef, state)
