"""ViT encoder with Hugging Face ViTModel semantics (pre-LN blocks, CLS token, no pooler).

Images are NHWC. The decoder cross-attends to every token of the final LayerNorm's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_caption.config import ViTConfig
from nnx_caption.execution import Execution, run_blocks
from nnx_caption.layers import (
    MLP,
    Dense,
    LayerNorm,
    attention,
    dropout,
    heads_first,
)
from nnx_caption.sharding import constrain


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PyTorch's bicubic resize (align_corners=False, A=-0.75, edge clamp)."""
    a = -0.75

    def cubic(t: np.ndarray) -> list[np.ndarray]:  # weights of taps at offsets -1, 0, 1, 2
        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.minimum(np.floor(src), in_size - 1).astype(np.int64)
    t = np.clip(src - base, 0.0, 1.0)
    weights = np.zeros((out_size, in_size), np.float64)
    for offset, w in zip(range(-1, 3), cubic(t), strict=True):
        np.add.at(weights, (np.arange(out_size), np.clip(base + offset, 0, in_size - 1)), w)
    return weights.astype(np.float32)


class ViTEmbeddings(nnx.Module):
    prefix_tokens = 1  # CLS; DeiT adds a distillation token

    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p, c, e = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.cfg = cfg
        # A stride-p conv over p x p patches, stored HWIO, applied as one matmul per patch.
        self.patch = Dense(
            (p, p, c),
            e,
            (None, None, None, "embed"),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.cls = nnx.Param(jnp.zeros((e,), param_dtype), axes=("embed",))
        n_pos = cfg.grid_size**2 + self.prefix_tokens
        self.positions = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (n_pos, e), param_dtype), axes=(None, "embed")
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p = self.cfg.patch_size
        if c != self.cfg.num_channels:
            raise ValueError(f"images have {c} channels; the config says {self.cfg.num_channels}")
        gh, gw = h // p, w // p
        patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c).swapaxes(2, 3)
        x = self.patch(patches).reshape(b, gh * gw, -1)  # (B, S - k, E): one token per patch
        prefix = jnp.stack([t[...] for t in self.prefix()]).astype(x.dtype)  # (k, E)
        x = jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape)), x], axis=1)
        return x + self.position_table(h, w).astype(x.dtype)

    def prefix(self) -> list[nnx.Param]:
        """The learned tokens before the patches, in order (prefix_tokens of them)."""
        return [self.cls]

    def position_table(self, height: int, width: int) -> jax.Array:
        """Position embeddings, bicubically resized when the patch grid differs from training's,
        exactly as transformers' ViT `interpolate_pos_encoding` does."""
        table = self.positions[...]
        g, p = self.cfg.grid_size, self.cfg.patch_size
        gh, gw = height // p, width // p
        if gh * gw == g * g and height == width:
            return table
        k = self.prefix_tokens
        grid = table[k:].reshape(g, g, -1)
        rows, cols = jnp.asarray(bicubic_matrix(g, gh)), jnp.asarray(bicubic_matrix(g, gw))
        grid = jnp.einsum("ai,bj,ije->abe", rows, cols, grid, precision="highest")
        return jnp.concatenate([table[:k], grid.reshape(gh * gw, -1)], axis=0)


class ViTAttention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.q = Dense(e, (h, d), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.k = Dense(e, (h, d), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.v = Dense(e, (h, d), ("embed", "heads", "kv"), use_bias=cfg.qkv_bias, **kw)
        self.o = Dense((h, d), e, ("heads", "kv", "embed"), **kw)
        self.scale = d**-0.5
        self.dropout_rate = cfg.attention_probs_dropout_prob

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """x (B, S, E) -> (B, S, E): every image token attends to every other."""
        out = attention(
            self.q(x),
            heads_first(self.k(x)),
            heads_first(self.v(x)),
            None,
            self.scale,
            dropout_rate=self.dropout_rate,
            rngs=rngs,
        )
        return self.o(out)


class ViTBlock(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.attn = ViTAttention(cfg, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, **kw)
        self.dropout_rate = cfg.hidden_dropout_prob

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        x = x + dropout(self.attn(self.ln_1(x), rngs), self.dropout_rate, rngs)
        x = x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, rngs)
        return constrain(x, ("batch", "seq", "act_embed"))


class ViT(nnx.Module):
    embeddings_cls = ViTEmbeddings  # a subclass swaps in its own embeddings (DeiT) or block here
    block_cls = ViTBlock

    def __init__(
        self,
        cfg: ViTConfig,
        *,
        execution: Execution | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = self.embeddings_cls(cfg, **kw)
        self.blocks = nnx.List([self.block_cls(cfg, **kw) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, param_dtype=param_dtype)
        self.dropout_rate = cfg.hidden_dropout_prob
        self.dtype = dtype
        # scan / remat: how the blocks run, never what they compute (CaptionConfig.execution)
        self.execution = execution or Execution()

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(B, height, width, C) normalised images -> (B, S, E) last hidden state."""
        if self.dtype is not None:
            images = images.astype(self.dtype)
        x = dropout(self.embeddings(images), self.dropout_rate, rngs)
        x = constrain(x, ("batch", "seq", "act_embed"))
        x, _, _ = run_blocks(
            self.blocks,
            lambda block, x, i, _, rngs: (None, block(x, rngs)),
            x,
            rngs,
            self.execution,
        )
        return self.ln_f(x)  # (B, S, E)
