"""Building blocks shared by the ViT encoder and the GPT-2 decoder.

Every parameter is an `nnx.Param` with `axes` metadata naming its logical dims (see
sharding.py). Kernels keep their head structure, (embed, heads, head_dim) rather than
(embed, embed), so tensor parallelism can split heads without reshuffling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.sharding import Axes, constrain

Shape = int | Sequence[int]


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# transformers' ACT2FN names used by ViT / GPT-2 configs, with the same formulas.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "linear": lambda x: x,
}


def _tuple(shape: Shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


class Dense(nnx.Module):
    """y = x . kernel + bias, contracting the last len(in_shape) dims of x.

    kernel has shape (*in_shape, *out_shape): a plain Linear is Dense(E, F); an attention
    projection is Dense(E, (heads, head_dim)) or Dense((heads, head_dim), E).
    """

    def __init__(
        self,
        in_shape: Shape,
        out_shape: Shape,
        axes: Axes,
        *,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
        shape = in_shape + out_shape
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = nnx.Param(
            init_std * jax.random.normal(rngs.params(), shape, param_dtype), axes=tuple(axes)
        )
        self.bias = (
            nnx.Param(jnp.zeros(out_shape, param_dtype), axes=tuple(axes[self.n_in :]))
            if use_bias
            else None
        )
        self.lora: nnx.Module | None = nnx.data(None)  # low-rank adapter, see lora.py

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = self.dtype or x.dtype
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.lora is not None:
            y = y + self.lora(x.astype(dtype), self.n_in).reshape(y.shape)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last dim, computed in float32 as PyTorch does for fp32 inputs."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; active only when training passes `rngs` (a 'dropout' stream)."""
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float,
    *,
    upcast: bool = False,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """Softmax attention. q (B,T,H,D); k, v heads-first (B,H,S,D); mask bool broadcasting to
    (B,H,T,S). Returns (B,T,H,D).

    Keys and values come heads-first because that is the layout the batched matmuls read:
    decoding keeps its caches in it, so no step transposes them again. Scores and softmax run
    in float32 when `upcast` (GPT-2's reorder_and_upcast_attn); masked scores take the dtype's
    minimum, as transformers does, so a row never becomes NaN.
    """
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # Every einsum here maps onto a plain batched matmul over (B, H): XLA CPU runs a fused
    # transpose of a dot's output (e.g. "bhts,bhsd->bthd") ten times slower than the dot.
    scores = jnp.einsum("bhtd,bhsd->bhts", heads_first(q), k) * scale
    scores = constrain(scores, ("batch", "act_heads", "seq", None))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    probs = dropout(probs, dropout_rate, rngs)
    return heads_first(jnp.einsum("bhts,bhsd->bhtd", probs, v))


def heads_first(x: jax.Array) -> jax.Array:
    """(B, S, H, D) <-> (B, H, S, D): the key / value layout `attention` takes."""
    return x.transpose(0, 2, 1, 3)


def call_block(block: nnx.Module, remat: bool, *args):
    """block(*args); with `remat`, its activations are recomputed in the backward pass rather
    than kept from the forward pass (less memory, about a third more compute)."""
    if not remat:
        return block(*args)
    return nnx.remat(lambda b, *a: b(*a))(block, *args)


class MLP(nnx.Module):
    """fc -> activation -> proj, the feed-forward block of both models."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        activation: str,
        *,
        dtype: jnp.dtype | None,
        param_dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc = Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.proj = Dense(hidden, dim, ("mlp", "embed"), **kw)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.activation](self.fc(x))
        return self.proj(constrain(h, ("batch", "seq", "act_mlp")))
