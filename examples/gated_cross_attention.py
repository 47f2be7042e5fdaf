"""Flamingo-style tanh-gated cross-attention in every GPT-2 block, gates starting closed.

Each decoder block gets a second cross-attention over the image, with its own LayerNorm, whose
output joins the residual stream scaled by tanh(gate) (Alayrac et al. 2022, "GATED XATTN"). The
gate starts at 0, so the edited model starts as exactly the checkpoint it was loaded from, and
training opens it. The edit lives in this file: it subclasses the stock modules where the model
leaves room for it (`block_cls`, `decoder_cls`, `GPT2Block.image_kv`) and touches nothing else.

    python examples/gated_cross_attention.py --out out/gated    # the walk-through below

or, through the CLI, on any checkpoint and data:

    nnx-caption train --model_name_or_path weights/tiny \\
        --model_class examples/gated_cross_attention.py:GatedCaptioner \\
        --new_params 'decoder\\.blocks\\.\\d+\\.gated\\..*' ...
    nnx-caption predict OUT/run images/ --output_dir OUT/predict \\
        --model_class examples/gated_cross_attention.py:GatedCaptioner
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_caption as nc
from nnx_caption.gpt2 import GPT2, CrossAttention, GPT2Block
from nnx_caption.layers import LayerNorm

# The NNX paths of everything this edit adds: what from_pretrained / --new_params must be told.
NEW_PARAMS = (r"decoder\.blocks\.\d+\.gated\..*",)


class GatedCrossAttention(nnx.Module):
    def __init__(self, cfg: nc.GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.ln = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, param_dtype=param_dtype)
        self.attn = CrossAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # tanh(0) = 0: closed. Like biases and norms it is not weight-decayed (metadata, not name).
        self.gate = nnx.Param(jnp.zeros((), param_dtype), weight_decay=False)

    def __call__(self, x: jax.Array, layer, image_kv, rngs) -> jax.Array:
        """x (N, T, E) -> tanh(gate) * cross_attention(ln(x)), (N, T, E)."""
        return jnp.tanh(self.gate[...]) * self.attn(self.ln(x), layer, image_kv, rngs)


class GatedBlock(GPT2Block):
    def __init__(self, cfg: nc.GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gated = GatedCrossAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def image_kv(self, image: jax.Array) -> Any:
        # Projected once per image, for training and decoding alike (generate shares it by beam).
        return super().image_kv(image), self.gated.attn.image_kv(image)

    def __call__(self, x, layer, image_kv, mask, rngs, cache=None, start=0):
        stock_kv, gated_kv = image_kv
        x = x + self.gated(x, layer, gated_kv, rngs)  # before the block, as Flamingo does
        return super().__call__(x, layer, stock_kv, mask, rngs, cache, start)


class GatedGPT2(GPT2):
    block_cls = GatedBlock


class GatedCaptioner(nc.VisionEncoderDecoder):
    decoder_cls = GatedGPT2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/gated_cross_attention")
    parser.add_argument("--checkpoint", default="weights/tiny")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    from nnx_caption.cli import main as cli
    from nnx_caption.data import make_shapes

    # 1. Load the pretrained checkpoint into the edited model: every stock parameter from the
    #    file (strictly, as always), the gated cross-attention new.
    model = nc.from_pretrained(args.checkpoint, model_cls=GatedCaptioner, new_params=NEW_PARAMS)
    stock = nc.from_pretrained(args.checkpoint)
    size = model.config.encoder.image_size
    pixels = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    start = model.config.decoder_start_token_id
    ids = jnp.array([[start, 5, 9, 11], [start, 7, 7, 3]], jnp.int32)
    same = bool(jnp.array_equal(model(pixels, ids), stock(pixels, ids)))
    print(f"gates closed: logits equal the unedited model's: {same}")

    # 2. Train on the shapes data through the CLI; the export is NNX layout (the gates have no
    #    Hugging Face name), which --model_class loads.
    splits = make_shapes(os.path.join(args.out, "data"), n_train=512, n_validation=32, n_test=32)
    run = os.path.join(args.out, "run")
    spec = f"{os.path.relpath(__file__)}:GatedCaptioner"
    flags = ["--model_name_or_path", args.checkpoint, "--output_dir", run, "--model_class", spec]
    flags += ["--new_params", *NEW_PARAMS, "--train_file", splits["train"]]
    flags += ["--image_column", "file_name", "--caption_column", "text", "--do_train"]
    flags += ["--overwrite_output_dir", "--max_steps", str(args.steps), "--learning_rate", "2e-3"]
    flags += ["--per_device_train_batch_size", "16", "--logging_steps", "50"]
    flags += ["--max_target_length", "16"]
    if cli(["train", *flags]) != 0:
        sys.exit("training failed")

    # 3. Reload the trained model, see the gates open, decode, save and reload exactly.
    trained = nc.from_pretrained(run, model_cls=GatedCaptioner)
    gates = [float(jnp.tanh(b.gated.gate[...])) for b in trained.decoder.blocks]
    print(f"tanh(gate) per layer after {args.steps} steps: {np.round(gates, 3).tolist()}")
    tok = nc.Tokenizer.from_pretrained(run)
    proc = nc.ImageProcessor.from_pretrained(run)
    from PIL import Image

    files = sorted(f for f in os.listdir(splits["test"]) if f.endswith(".png"))[:4]
    images = [Image.open(os.path.join(splits["test"], f)) for f in files]
    out = nc.generate(trained, proc(images), max_length=16)
    captions = tok.batch_decode(out.sequences, skip_special_tokens=True)
    for f, caption in zip(files, captions, strict=True):
        print(f"  {f}: {caption.strip()}")
    nc.save_pretrained(trained, os.path.join(args.out, "saved"), layout="nnx")
    back = nc.from_pretrained(os.path.join(args.out, "saved"), model_cls=GatedCaptioner)
    exact = bool(jnp.array_equal(back(pixels, ids), trained(pixels, ids)))
    print(f"saved and reloaded (NNX layout): logits identical: {exact}")


if __name__ == "__main__":
    main()
