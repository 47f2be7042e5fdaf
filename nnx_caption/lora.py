"""LoRA: low-rank adapters on the attention and MLP projections, merged into plain weights.

`add_lora(model, rank)` gives every `Dense` created with `lora_target=True` (the attention and
MLP projections, tagged where they are made) an adapter y += (x A) B * alpha / rank, with A
random and B zero (so the model starts unchanged), as `nnx.LoRAParam` variables: training with
`TrainConfig(lora=True)` updates only those (and parameters declared new). `merge_lora(model)`
folds each adapter into its kernel and removes it, leaving a model that saves in HF layout like
any other.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption.layers import Dense


class LoRA(nnx.Module):
    def __init__(self, n_in: int, n_out: int, rank: int, alpha: float, *, dtype, rngs: nnx.Rngs):
        self.a = nnx.LoRAParam(
            jax.random.normal(rngs.params(), (n_in, rank), dtype) / math.sqrt(n_in)
        )
        self.b = nnx.LoRAParam(jnp.zeros((rank, n_out), dtype))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array, n_in: int) -> jax.Array:
        flat = x.reshape(*x.shape[: x.ndim - n_in], -1)
        return (flat @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype) * self.scale

    def delta(self) -> jax.Array:
        return self.a[...] @ self.b[...] * self.scale


def _targets(model: nnx.Module):
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and module.lora_target:
            yield module


def add_lora(model: nnx.Module, rank: int, alpha: float | None = None, seed: int = 0) -> int:
    """Adds adapters in place; returns how many Dense layers got one."""
    rngs = nnx.Rngs(seed)
    count = 0
    for dense in list(_targets(model)):
        shape = dense.kernel[...].shape
        n_in, n_out = math.prod(shape[: dense.n_in]), math.prod(shape[dense.n_in :])
        dense.lora = LoRA(
            n_in, n_out, rank, alpha or rank, dtype=dense.kernel[...].dtype, rngs=rngs
        )
        count += 1
    return count


def merge_lora(model: nnx.Module) -> None:
    """kernel += A B * scale for every adapter, then the adapters are dropped."""
    for dense in list(_targets(model)):
        if dense.lora is not None:
            kernel = dense.kernel[...]
            dense.kernel[...] = kernel + dense.lora.delta().reshape(kernel.shape).astype(
                kernel.dtype
            )
            dense.lora = None
