"""DeiT encoder with Hugging Face DeiTModel semantics: a ViT whose embeddings put a distillation
token after CLS (both with their own position embedding). The blocks, the final LayerNorm and
the weight layout are ViT's; the decoder cross-attends to every token, the distillation one
included, as in transformers' VisionEncoderDecoderModel (TrOCR-small's encoder)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import DeiTConfig
from nnx_caption.vit import ViT, ViTEmbeddings


class DeiTEmbeddings(ViTEmbeddings):
    prefix_tokens = 2  # CLS, distillation

    def __init__(self, cfg: DeiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.distillation = nnx.Param(jnp.zeros((cfg.hidden_size,), param_dtype), axes=("embed",))

    def prefix(self) -> list[nnx.Param]:
        return [self.cls, self.distillation]


class DeiT(ViT):
    embeddings_cls = DeiTEmbeddings
