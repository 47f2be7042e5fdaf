"""TrOCR decoder with Hugging Face TrOCRForCausalLM semantics (microsoft/trocr-*).

Each block is post-LN: x = ln_1(x + self_attn(x)); x = ln_cross(x + cross_attn(x, image));
x = ln_2(x + mlp(x)). Token embeddings are scaled by sqrt(d_model) where `scale_embedding`
says so; positions are learned (a table offset by 2) or sinusoidal ones that skip padding
tokens (fairseq's); `layernorm_embedding` normalises their sum; there is no final LayerNorm.
The output projection is the token embedding when tied. The decoding path (one call with or
without a cache, cross-attention K/V once per image, the recorded cross-attention maps) is
GPT-2's: only the modules differ. Shapes use the legend in layers.py.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_caption.config import TrOCRConfig
from nnx_caption.execution import Execution
from nnx_caption.gpt2 import (
    GPT2,
    KV,
    CrossAttention,
    GPT2Block,
    Scale,
    SelfAttention,
    embedding_table,
    output_projection,
)
from nnx_caption.layers import MLP, Dense, LayerNorm, dropout, heads_first
from nnx_caption.sharding import constrain

POSITION_OFFSET = 2  # TrOCR's learned table starts at row 2 (fairseq's padding convention)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which TrOCR uses


@functools.lru_cache(maxsize=8)
def sinusoids(rows: int, width: int, pad: int) -> np.ndarray:
    """(rows, width) float32: TrOCRSinusoidalPositionalEmbedding.get_embedding, the padding
    row zero."""
    half = width // 2
    step = np.float32(math.log(10000) / (half - 1))
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)  # (width / 2,)
    angles = np.arange(rows, dtype=np.float32)[:, None] * freqs[None]  # (rows, width / 2)
    table = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if width % 2:
        table = np.concatenate([table, np.zeros((rows, 1), np.float32)], axis=1)
    table[pad] = 0
    return table


def _projection(cfg: Any, in_dim: int, **kw) -> Dense:
    """One head-structured nn.Linear (with bias), in_dim -> (H, D)."""
    h, d = cfg.num_heads, cfg.head_dim
    return Dense(in_dim, (h, d), ("embed", "heads", "kv"), init_std=cfg.init_std, **kw)


class TrOCRSelfAttention(SelfAttention):
    """GPT-2's self-attention (cache included) over separate q, k, v projections (BERT's
    too: any decoder config's width, heads and init_std)."""

    def __init__(self, cfg: Any, *, dropout_rate: float, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.width, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.q, self.k, self.v = (_projection(cfg, e, **kw) for _ in range(3))
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), init_std=cfg.init_std, **kw)
        self.scale = Scale(d**-0.5, by_layer=False)
        self.upcast = False
        self.dropout_rate = dropout_rate

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (N, T, E) -> q (N, T, H, D), k and v heads-first (N, H, T, D)."""
        return self.q(x), heads_first(self.k(x)), heads_first(self.v(x))


class TrOCRCrossAttention(CrossAttention):
    """GPT-2's cross-attention over separate projections; keys and values read the encoder's
    width where `cross_attention_hidden_size` is set (no enc_to_dec_proj then)."""

    def __init__(self, cfg: Any, *, dropout_rate: float, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.width, cfg.num_heads, cfg.head_dim
        states = getattr(cfg, "cross_attention_hidden_size", None) or e
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.q = _projection(cfg, e, **kw)
        self.k, self.v = _projection(cfg, states, **kw), _projection(cfg, states, **kw)
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), init_std=cfg.init_std, **kw)
        self.scale = Scale(d**-0.5, by_layer=False)
        self.upcast = False
        self.dropout_rate = dropout_rate

    def image_kv(self, image: jax.Array) -> KV:
        """image (B, S, E') encoder states -> their keys and values, once per image."""
        return heads_first(self.k(image)), heads_first(self.v(image))


class TrOCRBlock(GPT2Block):
    """Post-LN, where GPT-2's block is pre-LN; the same call (and image_kv) otherwise."""

    def __init__(self, cfg: TrOCRConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.build(
            cfg,
            eps=LAYER_NORM_EPS,
            activation=cfg.activation_function,
            dropout_rate=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def build(
        self, cfg: Any, *, eps, activation, dropout_rate, attention_dropout, activation_dropout,
        dtype, param_dtype, rngs,
    ) -> None:  # fmt: skip
        """The post-LN block's modules, from a decoder config and its family's constants."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = cfg.width
        self.attn = TrOCRSelfAttention(cfg, dropout_rate=attention_dropout, **kw)
        self.ln_1 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.cross = TrOCRCrossAttention(cfg, dropout_rate=attention_dropout, **kw)
        self.ln_cross = LayerNorm(e, eps, param_dtype=param_dtype)
        std = cfg.init_std
        self.mlp = MLP(
            e, cfg.inner_size, activation, init_std=std, proj_std=std,
            dropout_rate=activation_dropout, **kw,
        )  # fmt: skip
        self.ln_2 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.dropout_rate = dropout_rate

    def __call__(
        self,
        x: jax.Array,
        layer: jax.Array | int,
        image_kv: Any,
        mask: jax.Array,
        rngs: nnx.Rngs | None,
        cache: KV | None = None,
        start: jax.Array | int = 0,
    ) -> tuple[KV | None, jax.Array]:
        """x (N, T, E) -> (updated cache, (N, T, E))."""
        cache, h = self.attn(x, layer, mask, rngs, cache, start)
        x = self.ln_1(x + dropout(h, self.dropout_rate, rngs))
        h = self.cross(x, layer, image_kv, rngs)
        x = self.ln_cross(x + dropout(h, self.dropout_rate, rngs))
        x = self.ln_2(x + dropout(self.mlp(x, rngs), self.dropout_rate, rngs))
        return cache, constrain(x, ("batch", "seq", "act_embed"))


class TrOCR(GPT2):
    """GPT-2's decoding path with TrOCR's embeddings, blocks and head."""

    block_cls = TrOCRBlock

    def __init__(
        self,
        cfg: TrOCRConfig,
        *,
        execution: Execution | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = cfg.d_model
        self.cfg = cfg
        self.wte = embedding_table(cfg, cfg.vocab_size, ("vocab", "embed"), param_dtype, rngs)
        rows = cfg.max_position_embeddings + POSITION_OFFSET  # learned positions start at row 2
        self.wpe = (
            embedding_table(cfg, rows, (None, "embed"), param_dtype, rngs)
            if cfg.use_learned_position_embeddings
            else None
        )
        self.ln_embedding = (
            LayerNorm(e, LAYER_NORM_EPS, param_dtype=param_dtype)
            if cfg.layernorm_embedding
            else None
        )
        self.blocks = nnx.List([self.block_cls(cfg, **kw) for _ in range(cfg.decoder_layers)])
        self.lm_head = output_projection(cfg, **kw)  # output_projection
        self.embed_scale = math.sqrt(e) if cfg.scale_embedding else 1.0
        self.dtype = dtype
        self.execution = execution or Execution()

    def embed(self, ids: jax.Array, start: jax.Array | int, rngs: nnx.Rngs | None) -> jax.Array:
        """ids (N, T) at positions start.. -> (N, T, E): scaled token embeddings + positions,
        normalised where `layernorm_embedding` says so."""
        cfg = self.cfg
        x = jnp.take(self.wte[...], ids, axis=0)  # (N, T, E)
        # nn.Embedding(padding_idx=pad): the pad row is read, but never learns.
        x = jnp.where((ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        x = x * self.embed_scale
        if self.wpe is not None:
            positions = start + jnp.arange(ids.shape[1]) + POSITION_OFFSET  # (T,)
            x = x + jnp.take(self.wpe[...], positions, axis=0)
        else:  # fairseq's: real tokens count from pad + 1 (after `start` cached ones), pads sit
            # at the zero row pad
            pad = cfg.pad_token_id
            real = (ids != pad).astype(jnp.int32)  # (N, T)
            positions = (jnp.cumsum(real, axis=1) + start) * real + pad
            table = sinusoids(cfg.max_position_embeddings + pad + 1, cfg.d_model, pad)
            x = x + jnp.take(jnp.asarray(table), positions, axis=0)
        if self.ln_embedding is not None:
            x = self.ln_embedding(x)
        return dropout(x.astype(self.compute_dtype), cfg.dropout, rngs)

    def head(self, x: jax.Array) -> jax.Array:
        """No final LayerNorm: the last block's output goes straight to the projection."""
        return self.project_out(x)
