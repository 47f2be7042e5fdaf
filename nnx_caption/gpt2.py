"""GPT-2 decoder with cross-attention (Hugging Face GPT2LMHeadModel with add_cross_attention).

Each block: x += self_attn(ln_1(x)); x += cross_attn(ln_cross(x), image); x += mlp(ln_2(x)).
The LM head is the token embedding itself (one array, shared), unless the config unties it.
Shapes use the legend in layers.py. One path serves training and decoding: every call returns
(logits, cache), the cache being None when none was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.config import GPT2Config
from nnx_caption.execution import Execution, recording, run_blocks
from nnx_caption.layers import (
    MLP,
    Dense,
    LayerNorm,
    Mask,
    attention,
    contract,
    dropout,
    heads_first,
)
from nnx_caption.sharding import constrain

# Keys and values of one layer, heads-first: each (N, H, S, D). Decoding keeps its
# self-attention cache (S = max_length) and the image's cross-attention K/V (S = image tokens,
# N = B: one per image) in it.
KV = tuple[jax.Array, jax.Array]


@dataclass(frozen=True)
class Scale:
    """GPT-2's attention scale, from the layer index given at call time (a traced int under
    scan over layers), so that no block stores a per-layer constant."""

    base: float  # 1 / sqrt(head_dim), or 1 without scale_attn_weights
    by_layer: bool  # scale_attn_by_inverse_layer_idx: also divided by layer + 1

    @classmethod
    def of(cls, cfg: GPT2Config) -> Scale:
        base = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        return cls(base, cfg.scale_attn_by_inverse_layer_idx)

    def __call__(self, layer: jax.Array | int) -> jax.Array | float:
        return self.base / (layer + 1) if self.by_layer else self.base


def _init_stds(cfg: GPT2Config) -> tuple[float, float]:
    """transformers' GPT-2 init: normal(0, initializer_range) weights, and the projections back
    into the residual stream (every c_proj) at initializer_range / sqrt(2 * n_layer)."""
    return cfg.initializer_range, cfg.initializer_range / math.sqrt(2 * cfg.n_layer)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        std, proj_std = _init_stds(cfg)
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.qkv = Dense(e, (3, h, d), ("embed", None, "heads", "kv"), init_std=std, **kw)  # c_attn
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), init_std=proj_std, **kw)  # c_proj
        self.scale = Scale.of(cfg)
        self.upcast = cfg.reorder_and_upcast_attn
        self.dropout_rate = cfg.attn_pdrop

    def __call__(
        self,
        x: jax.Array,
        layer: jax.Array | int,
        mask: Mask,
        rngs: nnx.Rngs | None,
        cache: KV | None = None,
        start: jax.Array | int = 0,
    ) -> tuple[KV | None, jax.Array]:
        """x (N, T, E): the tokens at positions start..; with a cache they are written into it
        and attend to all of it. Returns (updated cache, (N, T, E))."""
        q, k, v = self.project(x)
        if cache is not None:
            at = (0, 0, start, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)  # (N,H,S,D)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
            cache = (k, v)
        out = attention(
            q,
            k,
            v,
            mask,
            self.scale(layer),
            upcast=self.upcast,
            dropout_rate=self.dropout_rate,
            rngs=rngs,
        )  # (N, T, H, D)
        return cache, self.o(out)

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (N, T, E) -> q (N, T, H, D), k and v heads-first (N, H, T, D)."""
        qkv = self.qkv(x)  # (N, T, 3, H, D)
        return qkv[:, :, 0], heads_first(qkv[:, :, 1]), heads_first(qkv[:, :, 2])


class CrossAttention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.n_embd, cfg.n_head, cfg.head_dim
        std, proj_std = _init_stds(cfg)
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.q = Dense(e, (h, d), ("embed", "heads", "kv"), init_std=std, **kw)  # HF q_attn
        self.kv = Dense(e, (2, h, d), ("embed", None, "heads", "kv"), init_std=std, **kw)  # c_attn
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), init_std=proj_std, **kw)  # HF c_proj
        self.scale = Scale.of(cfg)
        self.upcast = cfg.reorder_and_upcast_attn
        self.dropout_rate = cfg.attn_pdrop

    def image_kv(self, image: jax.Array) -> KV:
        """image (B, S, E) encoder states -> their keys and values, computed once per image."""
        kv = self.kv(image)  # (B, S, 2, H, D)
        return heads_first(kv[:, :, 0]), heads_first(kv[:, :, 1])

    def __call__(
        self, x: jax.Array, layer: jax.Array | int, kv: KV, rngs: nnx.Rngs | None
    ) -> jax.Array:
        """x (N, T, E), N a multiple of the B images in kv: the rows of an image (beams,
        captions) are adjacent and share its one K/V instead of a copy each. Cross-attention has
        no mask, so the rows of an image fold into its query axis and the result is exact.
        Returns (N, T, E). When the blocks' runner records (GPT2.cross_attention_weights), the
        weights (N, T, H, S) float32 are sown as "weights" (nnx.Intermediate), whatever block
        holds this module as `cross`."""
        n, t = x.shape[:2]
        images, heads, _, head_dim = kv[0].shape
        q = self.q(x).reshape(images, -1, heads, head_dim)  # (B, N / B * T, H, D)
        keep = recording()  # the blocks' runner keeps what is sown: the maps are wanted
        out = attention(
            q,
            kv[0],
            kv[1],
            None,
            self.scale(layer),
            upcast=self.upcast,
            dropout_rate=self.dropout_rate,
            rngs=rngs,
            return_weights=keep,
        )  # (B, N / B * T, H, D), and with `keep` the weights (B, H, N / B * T, S)
        if keep:
            out, weights = out
            weights = weights.transpose(0, 2, 1, 3).reshape(n, t, heads, -1)  # (N, T, H, S)
            self.sow(nnx.Intermediate, "weights", weights)
        return self.o(out.reshape(n, t, *out.shape[2:]))  # (N, T, E)


class GPT2Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        std, proj_std = _init_stds(cfg)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e, eps = cfg.n_embd, cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.attn = SelfAttention(cfg, **kw)
        self.ln_cross = LayerNorm(e, eps, param_dtype=param_dtype)
        self.cross = CrossAttention(cfg, **kw)
        self.ln_2 = LayerNorm(e, eps, param_dtype=param_dtype)
        self.mlp = MLP(
            e, cfg.inner_size, cfg.activation_function, init_std=std, proj_std=proj_std, **kw
        )
        self.dropout_rate = cfg.resid_pdrop

    def image_kv(self, image: jax.Array) -> Any:
        """What this block reads of the image states (B, S, E), computed once per image and
        passed back to every call as `image_kv`: here the cross-attention's K/V."""
        return self.cross.image_kv(image)

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
        cache, h = self.attn(self.ln_1(x), layer, mask, rngs, cache, start)
        x = x + dropout(h, self.dropout_rate, rngs)
        h = self.cross(self.ln_cross(x), layer, image_kv, rngs)
        x = x + dropout(h, self.dropout_rate, rngs)
        x = x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, rngs)
        return cache, constrain(x, ("batch", "seq", "act_embed"))


def embedding_table(cfg: Any, rows: int, axes: tuple, param_dtype, rngs: nnx.Rngs) -> nnx.Param:
    """A (rows, width) embedding table drawn normal(0, init_std), as transformers initialises
    any decoder family's embeddings."""
    shape = (rows, cfg.width)
    return nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), shape, param_dtype), axes=axes)


def output_projection(cfg: Any, **kw) -> Dense | None:
    """The LM head (E -> V, no bias), or None where the config ties it to the token embedding."""
    if cfg.tie_word_embeddings:
        return None
    return Dense(
        cfg.width, cfg.vocab_size, ("embed", "vocab"), use_bias=False, init_std=cfg.init_std, **kw
    )


class GPT2(nnx.Module):
    block_cls = GPT2Block  # a subclass swaps in its own block here

    def __init__(
        self,
        cfg: GPT2Config,
        *,
        execution: Execution | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg = cfg
        self.wte = embedding_table(cfg, cfg.vocab_size, ("vocab", "embed"), param_dtype, rngs)
        self.wpe = embedding_table(cfg, cfg.n_positions, (None, "embed"), param_dtype, rngs)
        self.blocks = nnx.List([self.block_cls(cfg, **kw) for _ in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.lm_head = output_projection(cfg, **kw)
        self.dtype = dtype
        # scan / remat: how the blocks run, never what they compute (CaptionConfig.execution)
        self.execution = execution or Execution()

    @property
    def compute_dtype(self) -> jnp.dtype:
        return self.dtype or self.wte[...].dtype

    def cross_kv(self, image: jax.Array) -> list[Any]:
        """Every block's image_kv of the image states (B, S, E), projected once per image."""
        image = image.astype(self.compute_dtype)
        return [block.image_kv(image) for block in self.blocks]

    def init_cache(self, rows: int, max_len: int) -> list[KV]:
        """An empty self-attention cache: per layer, keys and values of shape (N, H, S, D) with
        S = max_len."""
        shape = (rows, self.cfg.num_heads, max_len, self.cfg.head_dim)
        zeros = jnp.zeros(shape, self.compute_dtype)
        return [(zeros, zeros) for _ in self.blocks]

    def __call__(
        self,
        ids: jax.Array,
        image: jax.Array | None = None,
        mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        *,
        cross_kv: list[Any] | None = None,
        cache: list[KV] | None = None,
        start: jax.Array | int = 0,
    ) -> tuple[jax.Array, list[KV] | None]:
        """ids (N, T), the tokens at positions start.. -> (logits (N, T, V) float32, cache).

        The image comes as `image` (B, S, E) encoder states, N / B rows per image
        (image-major), or as `cross_kv` (from `cross_kv(image)`, computed once per image).
        `mask` (N, T) is 1 for real tokens. Training and scoring pass no cache: every position
        attends causally to the others. Decoding passes `cache` (from `init_cache`): the tokens
        are written into it and attend to all of it, and the updated cache is returned.
        """
        x, new_cache, _ = self._blocks(ids, image, mask, rngs, cross_kv, cache, start)
        logits = constrain(self.head(x), ("batch", "seq", "act_vocab"))
        return logits, (None if cache is None else new_cache)

    def head(self, x: jax.Array) -> jax.Array:
        """The last block's output (N, T, E) -> logits (N, T, V): ln_f, then the projection."""
        return self.project_out(self.ln_f(x))

    def project_out(self, x: jax.Array) -> jax.Array:
        """x (N, T, E) -> logits (N, T, V) float32 whatever the compute dtype: the loss and the
        search's log-softmax want them there, and the matmul accumulates in float32 anyway."""
        if self.lm_head is not None:
            return contract(x, self.lm_head.kernel[...], 1, x.dtype)
        # tied: the embedding table is the output projection
        wte = self.wte[...].astype(x.dtype)
        return jnp.einsum("nte,ve->ntv", x, wte, preferred_element_type=jnp.float32)

    def embed(self, ids: jax.Array, start: jax.Array | int, rngs: nnx.Rngs | None) -> jax.Array:
        """ids (N, T) at positions start.. -> (N, T, E): token + position embeddings."""
        positions = start + jnp.arange(ids.shape[1])
        x = jnp.take(self.wte[...], ids, axis=0) + jnp.take(self.wpe[...], positions, axis=0)
        return dropout(x.astype(self.compute_dtype), self.cfg.embd_pdrop, rngs)

    def cross_attention_weights(
        self,
        ids: jax.Array,
        image: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        cross_kv: list[Any] | None = None,
    ) -> jax.Array:
        """(N, T, L, H, S) float32: each position's cross-attention weights over the image
        tokens, in every layer and head, for ids (N, T) read as in training (no cache): what
        each block's `cross` module recorded, an edited block's too."""
        _, _, recorded = self._blocks(ids, image, mask, None, cross_kv, None, 0, record=True)
        try:
            weights = [layer["cross"]["weights"].get_value()[0] for layer in recorded]
        except KeyError:
            raise ValueError(
                f"{type(self.blocks[0]).__name__} records no cross-attention weights: the maps "
                "come from a CrossAttention module held by each block as `cross`"
            ) from None
        return jnp.stack(weights, axis=2)

    def _blocks(self, ids, image, mask, rngs, cross_kv, cache, start, record=False):
        """The embeddings and every block: (x (N, T, E) before ln_f, each layer's output, and
        with `record` what each layer recorded)."""
        t = ids.shape[1]
        if cache is None and t > self.cfg.max_positions:
            raise ValueError(f"{t} decoder tokens exceed the {self.cfg.max_positions} positions")
        x = constrain(self.embed(ids, start, rngs), ("batch", "seq", "act_embed"))  # (N, T, E)
        attend = Mask(causal=True, start=start, keys=mask)  # mask (N, S): the real tokens
        if cross_kv is None:
            image = image.astype(self.compute_dtype)
        n = len(self.blocks)
        per_layer = list(zip(cross_kv or [None] * n, cache or [None] * n, strict=True))

        def layer(block: GPT2Block, x: jax.Array, i, extra, rngs) -> tuple[KV | None, jax.Array]:
            image_kv, layer_cache = extra
            if image_kv is None:  # projected inside the layer: under scan, one layer's at a time
                image_kv = block.image_kv(image)
            return block(x, i, image_kv, attend, rngs, layer_cache, start)

        return run_blocks(self.blocks, layer, x, rngs, self.execution, per_layer, record)
