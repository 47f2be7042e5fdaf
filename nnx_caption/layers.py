"""Building blocks shared by the ViT encoder and the GPT-2 decoder.

Dimension legend, used in shape comments, docstrings and einsum strings across the models:
    B  images in a batch            N  decoder rows (captions, beams): a multiple of B, image-major
    T  decoder tokens (queries)     S  keys: image tokens, or the self-attention cache length
    E  model width                  H  heads            D  head_dim        F  MLP hidden width
    V  vocabulary                   L  layers           K  beams per image (N = B * K)
Images enter as (B, height, width, C) pixels; the ViT makes S = 1 + patches tokens of them.
(Image code outside the models, processing.py and data/, writes an image as (H, W, 3).)

Every parameter is an `nnx.Param` with metadata saying what it is, set here where it is
created and read by the rules that depend on it (nothing is decided from a parameter's name):
    axes          logical dims, mapped onto the mesh by sharding.RULES;
    weight_decay  False for biases and norm parameters (AdamW leaves them alone; default True).
A `Dense` made with `lora_target=True` is one that `lora.add_lora` adapts. Kernels keep their
head structure, (E, H, D) rather than (E, E), so tensor parallelism can split heads without
reshuffling.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_caption.execution import Execution as Execution  # public here too (the API names it)
from nnx_caption.execution import attention_kernel, say_once
from nnx_caption.execution import run_blocks as run_blocks  # as before the split
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


def contract(x: jax.Array, kernel: jax.Array, n_in: int, dtype: jnp.dtype) -> jax.Array:
    """x . kernel over x's last n_in dims and kernel's first n_in, multiplied in `dtype` and
    accumulated in float32; returns float32.

    Written out with its own backward pass so that the backward matmuls, too, take `dtype`
    inputs: autodiff would pair the float32 cotangent with the `dtype` operand and run them in
    float32, at half bf16's speed. The kernel's gradient comes out in the kernel's own dtype
    (float32 master weights keep float32 gradients)."""
    return _contract(x, kernel, n_in, jnp.dtype(dtype))


def _dot(a: jax.Array, b: jax.Array, axes) -> jax.Array:
    return jnp.tensordot(a, b, axes=axes, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _contract(x, kernel, n_in, dtype):
    return _dot(x.astype(dtype), kernel.astype(dtype), n_in)


def _contract_fwd(x, kernel, n_in, dtype):
    return _contract(x, kernel, n_in, dtype), (x, kernel)


def _contract_bwd(n_in, dtype, residuals, g):
    x, kernel = residuals
    g, xc, kc = g.astype(dtype), x.astype(dtype), kernel.astype(dtype)
    n_out, n_batch = kernel.ndim - n_in, x.ndim - n_in
    out_g, out_k = range(g.ndim - n_out, g.ndim), range(n_in, kernel.ndim)
    dx = _dot(g, kc, (list(out_g), list(out_k)))  # (*batch, *in)
    if dtype == jnp.float32:
        # As one 2-D matmul over flattened rows: contracting several leading dims, XLA CPU
        # first transposes the saved input in a pass of its own (~5% of the fp32 train step).
        # In bfloat16 the flattened form is the slower one (~25%), so it stays as is there.
        rows = math.prod(x.shape[:n_batch])
        dk = _dot(xc.reshape(rows, -1), g.reshape(rows, -1), ([0], [0])).reshape(kernel.shape)
    else:
        dk = _dot(xc, g, (list(range(n_batch)), list(range(n_batch))))  # (*in, *out)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_contract.defvjp(_contract_fwd, _contract_bwd)


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
        lora_target: bool = False,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = _tuple(in_shape), _tuple(out_shape)
        shape = in_shape + out_shape
        self.n_in = len(in_shape)
        self.dtype = dtype
        # normal(0, init_std) kernel and zero bias: transformers' _init_weights for Linear/Conv1D.
        self.kernel = nnx.Param(
            init_std * jax.random.normal(rngs.params(), shape, param_dtype), axes=tuple(axes)
        )
        self.bias = (
            nnx.Param(
                jnp.zeros(out_shape, param_dtype),
                axes=tuple(axes[self.n_in :]),
                weight_decay=False,
            )
            if use_bias
            else None
        )
        self.lora_target = lora_target  # add_lora adapts this layer
        self.lora: nnx.Module | None = nnx.data(None)  # low-rank adapter, see lora.py

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = contract(x, self.kernel[...], self.n_in, dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        y = y.astype(dtype)
        if self.lora is not None:
            y = y + self.lora(x.astype(dtype), self.n_in).reshape(y.shape)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last dim, computed in float32 as PyTorch does for fp32 inputs."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",), weight_decay=False)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("embed",), weight_decay=False)

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


@dataclass(frozen=True)
class Mask:
    """Which keys each query may attend to, kept in the terms fused attention kernels take (a
    causal flag, key padding) rather than as a dense array; `dense` makes the array."""

    causal: bool = False  # query t attends to the keys at positions <= start + t
    start: jax.Array | int = 0  # the first query's position (a cache's write position)
    keys: jax.Array | None = None  # (N, S): 1 for real keys, 0 for padding; None: all real

    def dense(self, t: int, s: int) -> jax.Array | None:
        """(N or 1, 1, T, S) bool: True where query t may attend to key s; None: everywhere."""
        allowed = None
        if self.causal:
            positions = self.start + jnp.arange(t)
            allowed = (jnp.arange(s)[None, :] <= positions[:, None])[None, None]
        if self.keys is not None:
            real = self.keys.astype(bool)[:, None, None, :]
            allowed = real if allowed is None else allowed & real
        return allowed


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: Mask | jax.Array | None,
    scale: float | jax.Array,
    *,
    upcast: bool = False,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention. q (B,T,H,D); k, v heads-first (B,H,S,D); mask a Mask, or a dense
    bool array broadcasting to (B,H,T,S) (None: every query sees every key); scale a float or
    a traced scalar. Returns (B,T,H,D), and with
    `return_weights` the attention weights (B,H,T,S) float32 too (before dropout).

    It runs on the kernel the blocks run with (Execution.attention, set by run_blocks): ours,
    or one of jax.nn.dot_product_attention's where the case can be expressed there; a case
    that cannot (attention_cases) runs on ours, said once.
    """
    kernel = _fused_kernel(q, k, mask, scale, upcast, dropout_rate, rngs, return_weights)
    if kernel is not None:
        return _fused_attention(q, k, v, mask, scale, kernel)
    dense = mask.dense(q.shape[1], k.shape[2]) if isinstance(mask, Mask) else mask
    return _einsum_attention(q, k, v, dense, scale, upcast, dropout_rate, rngs, return_weights)


def _einsum_attention(q, k, v, mask, scale, upcast=False, dropout_rate=0.0, rngs=None,
                      return_weights=False):  # fmt: skip
    """Ours: mask a dense bool array broadcasting to (B,H,T,S), or None.

    Keys and values come heads-first because that is the layout the batched matmuls read:
    decoding keeps its caches in it, so no step transposes them again. Scores and softmax run
    in float32 when `upcast` (GPT-2's reorder_and_upcast_attn); masked scores take the dtype's
    minimum, as transformers does, so a row never becomes NaN.
    """
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    # Every einsum here maps onto a plain batched matmul over (B, H): XLA CPU runs a fused
    # transpose of a dot's output (e.g. "bhts,bhsd->bthd") ten times slower than the dot.
    f32 = jnp.float32  # products accumulate in float32 whatever the inputs' dtype
    scores = jnp.einsum("bhtd,bhsd->bhts", heads_first(q), k, preferred_element_type=f32) * scale
    scores = constrain(scores, ("batch", "act_heads", "seq", None))
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)  # (B, H, T, S)
    probs = dropout(weights.astype(v.dtype), dropout_rate, rngs)
    out = jnp.einsum("bhts,bhsd->bhtd", probs, v, preferred_element_type=f32)
    out = heads_first(out.astype(v.dtype))
    return (out, weights) if return_weights else out


def _fused_attention(q, k, v, mask: Mask | None, scale: float, kernel: str) -> jax.Array:
    """jax.nn.dot_product_attention: the causal mask as `is_causal`, key padding as
    `key_value_seq_lengths` (query_seq_lengths would zero the padded queries' rows)."""
    lengths = real = None
    if mask is not None and mask.keys is not None:
        real = mask.keys.astype(bool)  # (N, S)
        lengths = real.sum(-1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        heads_first(k),  # the kernel takes (B, S, H, D) keys and values, as queries
        heads_first(v),
        scale=float(scale),
        is_causal=mask is not None and mask.causal,
        key_value_seq_lengths=lengths,
        implementation=kernel,
    )  # (B, T, H, D)
    if lengths is None:
        return out
    # Lengths say "the first n keys are real"; a pad inside a sequence (left padding) they
    # cannot say: such a batch runs on ours, checked at run time.
    say_once(kernel, "a batch with pad tokens inside a sequence (checked for each batch)")
    right_padded = jnp.all(real == (jnp.arange(real.shape[-1]) < lengths[:, None]))
    dense = mask.dense(q.shape[1], k.shape[2])
    return jax.lax.cond(
        right_padded,
        lambda: out,
        lambda: _einsum_attention(q, k, v, dense, scale).astype(out.dtype),
    )


def cudnn_unusable(dtype: jnp.dtype, head_dim: int | None = None) -> str | None:
    """Why cuDNN flash attention cannot run here on (dtype, head_dim) inputs; None if it can.
    Without a head_dim (a flag's check, before any model is built), the device and dtype."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return f"it needs an NVIDIA GPU, and jax runs on {device.platform} here"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"it takes bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    capability = float(getattr(device, "compute_capability", "0") or 0)
    limit = 256 if capability >= 9.0 else 128
    if head_dim is not None and (head_dim % 8 or head_dim > limit):
        return f"head_dim {head_dim}: it needs a multiple of 8 up to {limit} on this GPU"
    return None


def _fused_kernel(q, k, mask, scale, upcast, dropout_rate, rngs, return_weights) -> str | None:
    """The jax.nn.dot_product_attention implementation this call runs on ("xla", "cudnn"), or
    None for ours: what Execution.attention asks, where the call's case can be expressed."""
    asked = attention_kernel()
    if asked == "einsum":
        return None
    kernel = asked
    if asked in ("cudnn", "auto"):
        why = cudnn_unusable(q.dtype, q.shape[-1])
        if why and asked == "cudnn":
            raise ValueError(f"attention 'cudnn' cannot run: {why}")
        kernel = None if why else "cudnn"
    if kernel is None:
        return None
    cases = (
        (mask is not None and not isinstance(mask, Mask), "a dense mask array"),
        (
            isinstance(mask, Mask)
            and mask.causal
            and not (isinstance(mask.start, int) and mask.start == 0 and q.shape[1] == k.shape[2]),
            "a decoding step with a cache (a fused kernel's causal mask is top-left)",
        ),
        (dropout_rate > 0 and rngs is not None, "attention dropout in training"),
        (not isinstance(scale, (int, float, np.floating)), "a per-layer scale under scan"),
        (upcast, "reorder_and_upcast_attn"),
        (return_weights, "attention weights (cross-attention maps)"),
    )
    for applies, case in cases:
        if applies:
            say_once(asked, case)
            return None
    return kernel


def heads_first(x: jax.Array) -> jax.Array:
    """(B, S, H, D) <-> (B, H, S, D): the key / value layout `attention` takes."""
    return x.transpose(0, 2, 1, 3)


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
        init_std: float = 0.02,
        proj_std: float = 0.02,
        dropout_rate: float = 0.0,  # on the activations (TrOCR's activation_dropout)
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, lora_target=True, rngs=rngs)
        self.fc = Dense(dim, hidden, ("embed", "mlp"), init_std=init_std, **kw)
        self.proj = Dense(hidden, dim, ("mlp", "embed"), init_std=proj_std, **kw)
        self.activation = activation
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = ACTIVATIONS[self.activation](self.fc(x))  # (..., F)
        h = dropout(h, self.dropout_rate, rngs)
        return self.proj(constrain(h, ("batch", "seq", "act_mlp")))  # (..., E)
