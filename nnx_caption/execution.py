"""How a stack of blocks runs: scan over layers, remat, and the attention kernel of the calls
inside them (Execution); run_blocks, which runs them so. It changes what is stored, compiled and
rounded, never the math: the models say what a block computes, this module how it is run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

logger = logging.getLogger("nnx_caption")

# The kernels Execution.attention names; what run_blocks runs its blocks with (and whether it
# records what they sow), for the attention calls inside them.
ATTENTION_KERNELS = ("einsum", "xla", "cudnn", "auto")
_RUNNING: contextvars.ContextVar[tuple[str, bool]] = contextvars.ContextVar(
    "nnx_caption blocks", default=("einsum", False)
)
_SAID: set[tuple[str, str]] = set()


@contextlib.contextmanager
def running(kernel: str, record: bool):
    """The blocks run within it take `kernel` for their attention and record what they sow."""
    token = _RUNNING.set((kernel, record))
    try:
        yield
    finally:
        _RUNNING.reset(token)


def attention_kernel() -> str:
    """The kernel the attention calls of the blocks running now take (Execution.attention)."""
    return _RUNNING.get()[0]


def recording() -> bool:
    """Whether the blocks running now keep what their modules sow (run_blocks' `record`)."""
    return _RUNNING.get()[1]


def say_once(kernel: str, case: str) -> None:
    if (kernel, case) not in _SAID:
        _SAID.add((kernel, case))
        logger.info("attention %r: %s runs on einsum", kernel, case)


@dataclass(frozen=True)
class Execution:
    """How a stack of blocks runs; it changes what is stored, compiled and rounded, never the
    math.

    scan: one `lax.scan` over the blocks' stacked parameters, so the block is traced and
        compiled once whatever the depth (the blocks must be identical in structure).
    remat: each block's activations are recomputed in the backward pass instead of kept from
        the forward pass (less memory, about a third more compute).
    remat_policy: with remat, the name of a `jax.checkpoint_policies` entry saying what is kept
        after all (e.g. "dots_with_no_batch_dims_saveable"); None keeps nothing.
    attention: the softmax attention kernel: "einsum" (ours), "xla" or "cudnn"
        (jax.nn.dot_product_attention's implementations; cudnn is flash attention on NVIDIA
        GPUs, an error where it cannot run), "auto" (cudnn where it can run, else einsum).
        A fused kernel changes rounding, never the math: the cases it cannot express (a
        decoding step with a cache, attention dropout in training, a per-layer scale under
        scan, reorder_and_upcast_attn, pads inside a sequence, cross-attention maps) run on
        einsum, said once.
    """

    scan: bool = False
    remat: bool = False
    remat_policy: str | None = None
    attention: str = "einsum"

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(
                f"attention {self.attention!r} is not one of {', '.join(ATTENTION_KERNELS)}"
            )
        if self.remat_policy is not None and not hasattr(
            jax.checkpoint_policies, self.remat_policy
        ):
            names = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
            raise ValueError(f"remat policy {self.remat_policy!r} is not one of {names}")


def run_blocks(
    blocks: Sequence[nnx.Module],
    layer: Callable[[nnx.Module, jax.Array, Any, Any, nnx.Rngs | None], tuple[Any, jax.Array]],
    x: jax.Array,
    rngs: nnx.Rngs | None,
    execution: Execution,
    per_layer: Sequence[Any] | None = None,
    record: bool = False,
) -> tuple[jax.Array, list[Any], list[nnx.State] | None]:
    """Runs the blocks in order: `out_i, x = layer(block_i, x, i, per_layer[i], rngs_i)`.
    Returns (x, [out_0, out_1, ...], what each block recorded or None).

    `i` is the layer index: a Python int when unrolled, a traced int32 under scan, so a
    per-layer constant (GPT-2's scale_attn_by_inverse_layer_idx) is computed from it at call
    time and the blocks stay identical in structure. per_layer[i] (e.g. a layer's cache) and
    out_i (its updated cache) are pytrees; None stands for nothing. Each block gets its own
    dropout stream, split from `rngs` up front: the unrolled loop and the scan draw the same
    masks, so they give the same result.

    What the blocks' modules record (`Module.sow(nnx.Intermediate, ...)`) is captured around
    each block, whatever it is: with `record`, returned per layer (an nnx.State by module
    path), carried out of the scan and the remat as outputs (a sown value would be lost under
    scan and refused under jax.checkpoint); without, dropped inside, where XLA drops its work
    (a module can ask `recording()` whether its values are wanted at all). The attention calls
    in the blocks run on execution.attention's kernel; on einsum while recording, since the
    maps are its weights.
    """
    kernel = "einsum" if record else execution.attention  # the maps are einsum's weights
    if record and execution.attention != "einsum":
        say_once(execution.attention, "recording cross-attention maps")
    with running(kernel, record):
        return _run_blocks(blocks, layer, x, rngs, execution, per_layer, record)


def _run_blocks(blocks, layer, x, rngs, execution, per_layer, record):
    n = len(blocks)
    keys = None if rngs is None else jax.random.split(rngs.dropout(), n)
    per_layer = [None] * n if per_layer is None else list(per_layer)
    parts = [nnx.split(block) for block in blocks]

    def apply(graphdef, state, x, index, extra, key):
        block = nnx.merge(graphdef, state)
        key = None if key is None else nnx.Rngs(dropout=key)
        (out, x), recorded = nnx.capture(layer, nnx.Intermediate)(block, x, index, extra, key)
        return (out, recorded if record else None), x

    if execution.remat:
        policy = execution.remat_policy and getattr(jax.checkpoint_policies, execution.remat_policy)
        apply = jax.checkpoint(apply, policy=policy, static_argnums=(0,))
    if not execution.scan:
        outs = []
        for i, (graphdef, state) in enumerate(parts):
            out, x = apply(graphdef, state, x, i, per_layer[i], None if keys is None else keys[i])
            outs.append(out)
    else:
        graphdef = parts[0][0]
        if any(g != graphdef for g, _ in parts):
            raise ValueError(
                "scan over layers needs blocks of one structure; these differ (a block built "
                "with per-layer attributes?): keep per-layer constants out of the blocks "
                "(compute them from the layer index), or run unscanned"
            )
        stack = functools.partial(jax.tree.map, lambda *a: jnp.stack(a))
        xs = (stack(*[s for _, s in parts]), stack(*per_layer), jnp.arange(n, dtype=jnp.int32))

        def body(x, layer_in):
            state, extra, index, key = layer_in
            out, x = apply(graphdef, state, x, index, extra, key)
            return x, out

        x, stacked = jax.lax.scan(body, x, (*xs, keys))
        outs = [jax.tree.map(lambda a: a[i], stacked) for i in range(n)]
    return x, [out for out, _ in outs], [recorded for _, recorded in outs] if record else None
