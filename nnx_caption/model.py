"""VisionEncoderDecoder: the encoder (ViT or DeiT), an optional width projection, the decoder
(GPT-2, TrOCR or BERT).

An edited architecture subclasses it (or replaces it) with the same constructor signature,
`(config, *, dtype, param_dtype, rngs)`; `encoder_cls` / `decoder_cls` (and the `block_cls` of
ViT and GPT2) are where a subclass swaps in its own modules. See examples/.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.bert import Bert
from nnx_caption.config import (
    BertConfig,
    CaptionConfig,
    DeiTConfig,
    GPT2Config,
    TrOCRConfig,
    ViTConfig,
)
from nnx_caption.deit import DeiT
from nnx_caption.gpt2 import GPT2
from nnx_caption.layers import Dense
from nnx_caption.trocr import TrOCR
from nnx_caption.vit import ViT

# Each family's config class -> its module.
ENCODERS: dict[type, type[nnx.Module]] = {ViTConfig: ViT, DeiTConfig: DeiT}
DECODERS: dict[type, type[nnx.Module]] = {GPT2Config: GPT2, TrOCRConfig: TrOCR, BertConfig: Bert}


class VisionEncoderDecoder(nnx.Module):
    # None: the config's family (ENCODERS, DECODERS); a subclass names its own module here.
    encoder_cls: type[nnx.Module] | None = None
    decoder_cls: type[nnx.Module] | None = None

    def __init__(
        self,
        config: CaptionConfig,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """`dtype` is the compute dtype (None: the parameters' own); parameters stay
        `param_dtype` (float32 master weights)."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        encoder_cls = self.encoder_cls or ENCODERS[type(config.encoder)]
        self.encoder = encoder_cls(config.encoder, execution=config.execution, **kw)
        e, d = config.encoder.hidden_size, config.decoder.width
        self.enc_to_dec_proj = (  # initialised from the decoder's initializer_range, as HF does
            Dense(e, d, (None, "embed"), init_std=config.decoder.init_std, **kw)
            if config.needs_enc_to_dec_proj
            else None
        )
        decoder_cls = self.decoder_cls or DECODERS[type(config.decoder)]
        self.decoder = decoder_cls(config.decoder, execution=config.execution, **kw)

    def encode(self, pixel_values: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(B, height, width, C) normalised images -> (B, S, E) states the decoder attends to."""
        states = self.encoder(pixel_values, rngs)
        if self.enc_to_dec_proj is not None:
            states = self.enc_to_dec_proj(states)
        return states

    def decode(
        self,
        decoder_input_ids: jax.Array,
        image_states: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """ids (N, T) and image states (B, S, E), N / B captions per image -> logits (N, T, V)."""
        return self.decoder(decoder_input_ids, image_states, decoder_attention_mask, rngs)[0]

    def __call__(
        self,
        pixel_values: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Logits (N, T, V). Dropout is active only when `rngs` (with a 'dropout' stream)
        is given, i.e. in training.

        pixel_values (B, height, width, C) may hold fewer images than there are captions
        (decoder_input_ids (N, T)): N / B captions per image, image-major (rows 0..k-1
        describe image 0). Each image is then encoded once and
        its captions share its cross-attention keys and values, as beams do in generate()."""
        images, rows = pixel_values.shape[0], decoder_input_ids.shape[0]
        if rows % images:
            raise ValueError(f"{rows} captions do not split evenly over {images} images")
        states = self.encode(pixel_values, rngs)
        return self.decode(decoder_input_ids, states, decoder_attention_mask, rngs)
