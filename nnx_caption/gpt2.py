"""GPT-2 decoder with cross-attention (Hugging Face GPT2LMHeadModel with add_cross_attention).

Each block: x += self_attn(ln_1(x)); x += cross_attn(ln_cross_attn(x), image); x += mlp(ln_2(x)).
The LM head is the token embedding itself (one array, shared), unless the config unties it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import GPT2Config
from nnx_caption.layers import MLP, Dense, LayerNorm, attention, dropout
from nnx_caption.sharding import constrain


def attention_scale(cfg: GPT2Config, layer: int) -> float:
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    return scale


class SelfAttention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(e, (3, h, d), ("embed", None, "heads", "kv"), **kw)  # HF c_attn
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), **kw)  # HF c_proj
        self.scale = attention_scale(cfg, layer)
        self.upcast = cfg.reorder_and_upcast_attn
        self.dropout_rate = cfg.attn_pdrop

    def __call__(self, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(
            q, k, v, mask, self.scale, upcast=self.upcast, dropout_rate=self.dropout_rate, rngs=rngs
        )
        return self.o(out)


class CrossAttention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Dense(e, (h, d), ("embed", "heads", "kv"), **kw)  # HF q_attn
        self.kv = Dense(e, (2, h, d), ("embed", None, "heads", "kv"), **kw)  # HF c_attn
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), **kw)  # HF c_proj
        self.scale = attention_scale(cfg, layer)
        self.upcast = cfg.reorder_and_upcast_attn
        self.dropout_rate = cfg.attn_pdrop

    def __call__(self, x: jax.Array, image: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        kv = self.kv(image)
        out = attention(
            self.q(x),
            kv[:, :, 0],
            kv[:, :, 1],
            None,
            self.scale,
            upcast=self.upcast,
            dropout_rate=self.dropout_rate,
            rngs=rngs,
        )
        return self.o(out)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e, eps = cfg.n_embd, cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.attn = SelfAttention(cfg, layer, **kw)
        self.ln_cross = LayerNorm(e, eps, param_dtype=param_dtype)
        self.cross = CrossAttention(cfg, layer, **kw)
        self.ln_2 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.mlp = MLP(e, cfg.inner_size, cfg.activation_function, **kw)
        self.dropout_rate = cfg.resid_pdrop

    def __call__(
        self, x: jax.Array, image: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None
    ) -> jax.Array:
        x = x + dropout(self.attn(self.ln_1(x), mask, rngs), self.dropout_rate, rngs)
        x = x + dropout(self.cross(self.ln_cross(x), image, rngs), self.dropout_rate, rngs)
        x = x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, rngs)
        return constrain(x, ("batch", "seq", "act_embed"))


class GPT2(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = cfg.n_embd
        self.cfg = cfg
        self.wte = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, e), param_dtype),
            axes=("vocab", "embed"),
        )
        self.wpe = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (cfg.n_positions, e), param_dtype),
            axes=(None, "embed"),
        )
        self.blocks = nnx.List([GPT2Block(cfg, i, **kw) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(e, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(e, cfg.vocab_size, ("embed", "vocab"), use_bias=False, **kw)
        )
        self.dtype = dtype

    def __call__(
        self,
        ids: jax.Array,
        image: jax.Array,
        mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """ids (B, T), image (B, S, n_embd) encoder states, mask (B, T) 1 = real token
        -> logits (B, T, vocab)."""
        t = ids.shape[1]
        if t > self.cfg.n_positions:
            raise ValueError(f"{t} decoder tokens exceed n_positions={self.cfg.n_positions}")
        wte = self.wte[...]
        dtype = self.dtype or wte.dtype
        x = jnp.take(wte, ids, axis=0) + self.wpe[...][:t]
        x = dropout(x.astype(dtype), self.cfg.embd_pdrop, rngs)
        x = constrain(x, ("batch", "seq", "act_embed"))
        attend = jnp.tril(jnp.ones((t, t), bool))[None, None]  # (1, 1, T, T) causal
        if mask is not None:
            attend = attend & mask.astype(bool)[:, None, None, :]
        image = image.astype(dtype)
        for block in self.blocks:
            x = block(x, image, attend, rngs)
        x = self.ln_f(x)
        if self.lm_head is not None:
            logits = self.lm_head(x)
        else:  # tied: the embedding table is the output projection
            logits = jnp.einsum("bte,ve->btv", x, wte.astype(dtype))
        return constrain(logits, ("batch", "seq", "act_vocab"))
