"""FLOP counts (multiply-add = 2 FLOPs) for MFU and decode throughput.

`xla_train_step` counts any model's training step from XLA's cost analysis: what the code
computes, so an edited architecture's MFU is right. The analytic counts below are the stock
architecture's, for decoding (a while loop, which XLA's count sees once) and as a cross-check:
every matmul, attention's two batched matmuls included; not normalisation, activations,
softmax and embedding lookups (a few percent at most).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnx_caption.config import CaptionConfig
from nnx_caption.execution import Execution
from nnx_caption.train import loss_and_grads


def xla_train_step(model: nnx.Module, cfg: Any, batch: Mapping[str, Any]) -> float:
    """Model FLOPs of one training step (train.loss_and_grads: forward and backward) of `model`
    under TrainConfig `cfg`, on batches shaped like `batch`, from XLA's cost analysis of a
    lowering that is never run. The blocks are unrolled and not rematerialised there, whatever
    the model's execution: XLA counts a scan's body once, and remat's recompute is hardware
    work, not model FLOPs. The optimizer update is not counted."""
    graphdef, state = nnx.split(model)
    abstract = nnx.merge(
        graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    )
    for _, module in nnx.iter_graph(abstract):  # a throwaway abstract copy, rebuilt unrolled
        if isinstance(module, nnx.Module) and isinstance(
            getattr(module, "execution", None), Execution
        ):
            module.execution = Execution()
    graphdef, state = nnx.split(abstract)
    shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}

    def grads(state, batch):
        return loss_and_grads(nnx.merge(graphdef, state), batch, jax.random.key(0), cfg)

    return float(jax.jit(grads).lower(state, shapes).cost_analysis()["flops"])


def encoder(
    cfg: CaptionConfig, images: int, height: int | None = None, width: int | None = None
) -> float:
    """The ViT forward over `images` images (and enc_to_dec_proj when present)."""
    e = cfg.encoder
    p = e.patch_size
    patches = ((height or e.image_size) // p) * ((width or e.image_size) // p)
    t, d = patches + 1, e.hidden_size
    layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * e.intermediate_size
    flops = 2 * patches * p * p * e.num_channels * d + e.num_hidden_layers * layer
    if cfg.needs_enc_to_dec_proj:
        flops += 2 * t * d * cfg.decoder.width
    return images * flops


def cross_kv(cfg: CaptionConfig, images: int, tokens: int) -> float:
    """Cross-attention keys and values of `tokens` image states, every layer."""
    d = cfg.decoder
    states = getattr(d, "cross_attention_hidden_size", None) or d.width  # K/V input width
    return images * d.num_layers * 2 * tokens * states * 2 * d.width


def decoder(cfg: CaptionConfig, rows: int, new: int, keys: int, image_tokens: int) -> float:
    """The decoder's forward (GPT-2's shapes; TrOCR's are the same) for `new` tokens per row
    attending to `keys` self-attention keys and `image_tokens` image states, excluding the
    cross-attention K/V projection (cross_kv)."""
    d = cfg.decoder
    e = d.width
    dense = 2 * e * 3 * e + 3 * 2 * e * e + 2 * 2 * e * d.inner_size  # qkv, o, cross q / o, mlp
    attend = 2 * 2 * e * (keys + image_tokens)
    per_token = d.num_layers * (dense + attend) + 2 * e * d.vocab_size  # + LM head
    return rows * new * per_token


def forward(cfg: CaptionConfig, batch: int, seq: int, images: int | None = None) -> float:
    """A training-style forward of `batch` captions of `seq` tokens: encoder, cross K/V and a
    causal decoder pass (causal attention counted as the full square, as it is computed).
    `images` (default: batch) is how many images the captions describe, each encoded once."""
    tokens = (cfg.encoder.image_size // cfg.encoder.patch_size) ** 2 + 1
    images = batch if images is None else images
    return (
        encoder(cfg, images) + cross_kv(cfg, images, tokens) + decoder(cfg, batch, seq, seq, tokens)
    )


def train_step(cfg: CaptionConfig, batch: int, seq: int, images: int | None = None) -> float:
    """Forward + backward (twice the forward's FLOPs)."""
    return 3 * forward(cfg, batch, seq, images)


def generate(
    cfg: CaptionConfig, images: int, beams: int, max_length: int, steps: int | None = None
) -> float:
    """One search as generate() runs it: the encoder and cross K/V once per image, then one
    decoder step per generated token for every row (beams), keys growing by one each step."""
    tokens = (cfg.encoder.image_size // cfg.encoder.patch_size) ** 2 + 1
    rows = images * beams
    steps = max_length - 1 if steps is None else steps
    flops = encoder(cfg, images) + cross_kv(cfg, images, tokens)
    return flops + sum(decoder(cfg, rows, 1, k + 1, tokens) for k in range(steps))
