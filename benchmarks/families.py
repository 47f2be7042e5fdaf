"""TrOCR-small and TrOCR-base shapes (random weights): parameter counts and greedy decode time,
nnx-caption generate() vs transformers' generate() (PyTorch, CPU), in one process.

    .venv/bin/python benchmarks/families.py [--repeats 3] [--batch 2] [--no-md]

trocr-small: DeiT (384 wide, 12 layers, image 384) + TrOCR (d_model 256, 6 layers, vocab
64044, learned positions, layernorm_embedding, scale_embedding, cross-attention reading the
encoder's width). trocr-base: ViT-B (768, image 384, no qkv bias) + TrOCR (1024, 12 layers,
vocab 50265). fp32, greedy, max_length 16 with EOS suppressed (min_length 16) so every run
decodes the full length; medians of --repeats runs after a first (compiling) call, whose time
is reported apart. Tokens are checked identical. Results: benchmarks/results/families.json
and the "Families" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from common import RESULTS_DIR, machine, machine_line, timed, update_results_md

MAX_LENGTH = 16
SHAPES = {
    "trocr-small": (
        dict(model_type="deit", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
             intermediate_size=1536, image_size=384, patch_size=16),
        dict(model_type="trocr", vocab_size=64044, d_model=256, decoder_layers=6,
             decoder_attention_heads=8, decoder_ffn_dim=1024, activation_function="relu",
             max_position_embeddings=512, layernorm_embedding=True, scale_embedding=True,
             cross_attention_hidden_size=384, tie_word_embeddings=False, pad_token_id=1,
             bos_token_id=0, eos_token_id=2),
    ),
    "trocr-base": (
        dict(model_type="vit", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, image_size=384, patch_size=16, qkv_bias=False),
        dict(model_type="trocr", vocab_size=50265, d_model=1024, decoder_layers=12,
             decoder_attention_heads=16, decoder_ffn_dim=4096, activation_function="gelu",
             max_position_embeddings=512, layernorm_embedding=True, scale_embedding=False,
             cross_attention_hidden_size=768, tie_word_embeddings=False, pad_token_id=1,
             bos_token_id=0, eos_token_id=2),
    ),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()

    import jax
    import torch
    from flax import nnx
    from transformers import VisionEncoderDecoderModel

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from reference import build_hf_model

    import nnx_caption as nc

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    for name, (enc, dec) in SHAPES.items():
        path = tempfile.mkdtemp(prefix=f"{name}-")
        build_hf_model(enc, dec, decoder_start_token_id=2, pad_token_id=1).save_pretrained(path)
        ref = VisionEncoderDecoderModel.from_pretrained(path).eval()
        ours = nc.from_pretrained(path)
        size = enc["image_size"]
        pixels = np.random.default_rng(0).standard_normal((args.batch, size, size, 3), np.float32)
        kw = dict(max_length=MAX_LENGTH, min_length=MAX_LENGTH, num_beams=1)
        first, ours_s, out = timed(
            lambda: jax.block_until_ready(nc.generate(ours, pixels, **kw).sequences), args.repeats
        )
        torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        with torch.no_grad():
            _, ref_s, ref_out = timed(
                lambda: ref.generate(pixel_values=torch_pixels, **kw), args.repeats
            )
        torch_params = sum(p.numel() for n, p in ref.named_parameters() if "pooler" not in n)
        ours_params = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
        rows.append(
            dict(
                shape=name,
                batch=args.batch,
                nnx_params=int(ours_params),
                torch_params=int(torch_params),
                nnx_s=ours_s,
                torch_s=ref_s,
                compile_s=first - ours_s,
                speedup=ref_s / ours_s,
                tokens_identical=bool(np.array_equal(np.asarray(out), ref_out.numpy())),
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    command = " ".join([".venv/bin/python", "benchmarks/families.py", *sys.argv[1:]])
    result = dict(machine=machine(), max_length=MAX_LENGTH, command=command, cases=rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "families.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(rows)
    print(md)
    if not args.no_md:
        update_results_md(
            "Families",
            (
                f"## Families\n\n{machine_line(result['machine'])}\n\nCommand: `{command}`\n\n"
                f"{md}\n\nRandom weights in the trocr-small and trocr-base shapes, fp32, greedy, "
                f"max_length {MAX_LENGTH} with EOS suppressed; medians after the first call, "
                "whose extra time (compiling) is reported apart. Parameters exclude the "
                "encoder's unused pooler.\n"
            ),
        )


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | parameters (nnx-caption / transformers) | batch | nnx-caption s | "
        "transformers s | vs transformers | compile s | same tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['nnx_params'] / 1e6:.1f}M / {r['torch_params'] / 1e6:.1f}M | "
            f"{r['batch']} | {r['nnx_s']:.2f} | {r['torch_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['compile_s']:.1f} | {'yes' if r['tokens_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
