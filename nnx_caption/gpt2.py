"""GPT-2 decoder with cross-attention (Hugging Face GPT2LMHeadModel with add_cross_attention).

Each block: x += self_attn(ln_1(x)); x += cross_attn(ln_cross_attn(x), image); x += mlp(ln_2(x)).
The LM head is the token embedding itself (one array, shared), unless the config unties it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import GPT2Config
from nnx_caption.layers import (
    MLP,
    Dense,
    Execution,
    LayerNorm,
    attention,
    contract,
    dropout,
    heads_first,
    run_blocks,
)
from nnx_caption.sharding import constrain


def attention_scale(cfg: GPT2Config, layer: int) -> float:
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if cfg.scale_attn_by_inverse_layer_idx:
        scale /= float(layer + 1)
    return scale


# Keys and values of one layer, heads-first: each (N, heads, length, head_dim). Decoding keeps
# its self-attention cache (length = max_length) and the image's cross-attention K/V in it.
KV = tuple[jax.Array, jax.Array]


class SelfAttention(nnx.Module):
    def __init__(self, cfg: GPT2Config, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(e, (3, h, d), ("embed", None, "heads", "kv"), **kw)  # HF c_attn
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), **kw)  # HF c_proj
        self.scale = attention_scale(cfg, layer)
        self.upcast = cfg.reorder_and_upcast_attn
        self.dropout_rate = cfg.attn_pdrop

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array,
        rngs: nnx.Rngs | None,
        cache: KV | None = None,
        start: jax.Array | int = 0,
    ) -> tuple[jax.Array, KV | None]:
        """With a cache, x holds the tokens at positions start.. and attends to the cache."""
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], heads_first(qkv[:, :, 1]), heads_first(qkv[:, :, 2])
        if cache is not None:
            at = (0, 0, start, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
            cache = (k, v)
        out = attention(
            q, k, v, mask, self.scale, upcast=self.upcast, dropout_rate=self.dropout_rate, rngs=rngs
        )
        return self.o(out), cache


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

    def image_kv(self, image: jax.Array) -> KV:
        """The image states' keys and values, computed once per image."""
        kv = self.kv(image)
        return heads_first(kv[:, :, 0]), heads_first(kv[:, :, 1])

    def __call__(self, x: jax.Array, kv: KV, rngs: nnx.Rngs | None) -> jax.Array:
        """kv: image_kv(image states). x may hold several rows per image (beams, returned
        sequences), image-major: those rows share one K/V instead of a copy each.
        Cross-attention has no mask, so the rows of an image fold into its query axis and the
        result is exact."""
        n, t = x.shape[:2]
        images, heads, _, head_dim = kv[0].shape
        q = self.q(x).reshape(images, -1, heads, head_dim)  # (images, rows * t, H, D)
        out = attention(
            q,
            kv[0],
            kv[1],
            None,
            self.scale,
            upcast=self.upcast,
            dropout_rate=self.dropout_rate,
            rngs=rngs,
        )
        return self.o(out.reshape(n, t, *out.shape[2:]))


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
        self,
        x: jax.Array,
        cross_kv: KV,
        mask: jax.Array,
        rngs: nnx.Rngs | None,
        cache: KV | None = None,
        start: jax.Array | int = 0,
    ) -> tuple[jax.Array, KV | None]:
        h, cache = self.attn(self.ln_1(x), mask, rngs, cache, start)
        x = x + dropout(h, self.dropout_rate, rngs)
        x = x + dropout(self.cross(self.ln_cross(x), cross_kv, rngs), self.dropout_rate, rngs)
        x = x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, rngs)
        return constrain(x, ("batch", "seq", "act_embed")), cache


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
        self.execution = Execution()  # scan / remat, set by training (TrainConfig)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return self.dtype or self.wte[...].dtype

    def cross_kv(self, image: jax.Array) -> list[KV]:
        """Each layer's cross-attention K/V of the image states, projected once per image."""
        image = image.astype(self.compute_dtype)
        return [block.cross.image_kv(image) for block in self.blocks]

    def init_cache(self, rows: int, max_len: int) -> list[KV]:
        shape = (rows, self.cfg.n_head, max_len, self.cfg.head_dim)
        zeros = jnp.zeros(shape, self.compute_dtype)
        return [(zeros, zeros) for _ in self.blocks]

    def __call__(
        self,
        ids: jax.Array,
        image: jax.Array | None = None,
        mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        cross_kv: list[KV] | None = None,
        cache: list[KV] | None = None,
        start: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, list[KV]]:
        """ids (N, T) -> logits (N, T, vocab).

        Training and scoring pass `image` (images, S, n_embd) encoder states, N / images rows
        per image (image-major), and `mask` (N, T), 1 for real tokens. Decoding passes
        `cross_kv` (from `cross_kv(image)`, one per image) and `cache` (from `init_cache`),
        ids being the tokens at positions start..; it then returns (logits, updated cache).
        """
        t = ids.shape[1]
        positions = start + jnp.arange(t)
        if cache is None and t > self.cfg.n_positions:
            raise ValueError(f"{t} decoder tokens exceed n_positions={self.cfg.n_positions}")
        wte = self.wte[...]
        x = jnp.take(wte, ids, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
        x = dropout(x.astype(self.compute_dtype), self.cfg.embd_pdrop, rngs)
        x = constrain(x, ("batch", "seq", "act_embed"))
        keys = t if cache is None else cache[0][0].shape[2]
        attend = (jnp.arange(keys)[None, :] <= positions[:, None])[None, None]  # causal
        if mask is not None:
            attend = attend & mask.astype(bool)[:, None, None, :]
        if cache is None:  # training / scoring: every position at once
            image = None if image is None else image.astype(self.compute_dtype)

            def layer(block: GPT2Block, x: jax.Array, kv: KV | None, rngs) -> jax.Array:
                kv = block.cross.image_kv(image) if kv is None else kv
                return block(x, kv, attend, rngs)[0]

            x = run_blocks(self.blocks, layer, x, rngs, self.execution, cross_kv)
        else:  # decoding: the tokens at positions start.., against the cache
            if cross_kv is None:
                cross_kv = self.cross_kv(image)
            new_cache = []
            for block, kv, layer_cache in zip(self.blocks, cross_kv, cache, strict=True):
                x, layer_cache = block(x, kv, attend, rngs, layer_cache, start)
                new_cache.append(layer_cache)
        x = self.ln_f(x)
        # Logits come out in float32 whatever the compute dtype: the loss and the search's
        # log-softmax want them there, and the matmul accumulates in float32 anyway.
        if self.lm_head is not None:
            logits = contract(x, self.lm_head.kernel[...], 1, x.dtype)
        else:  # tied: the embedding table is the output projection
            logits = jnp.einsum(
                "bte,ve->btv", x, wte.astype(x.dtype), preferred_element_type=jnp.float32
            )
        logits = constrain(logits, ("batch", "seq", "act_vocab"))
        return logits if cache is None else (logits, new_cache)
