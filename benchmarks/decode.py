"""Captioning throughput: nnx-caption generate() vs transformers' generate() (PyTorch, CPU).

    .venv/bin/python benchmarks/decode.py [--checkpoint DIR] [--repeats 3]

ViT-B/16 (224) + GPT-2 small with random weights (benchmarks/.cache, written once), fp32,
greedy and beam 4 at batch 1 and 8, max_length 16 with EOS suppressed (min_length 16) so every
run decodes the full length. Both run in this one process on the same images, one after the
other; each figure is the median of --repeats runs after a warm-up run. nnx-caption's compile
time (first call minus a steady call) is reported apart. Work is counted analytically
(nnx_caption.flops.generate) and reported against this machine's measured fp32 matmul peak.
Tokens are checked identical between the two. Results: benchmarks/results/decode.json and the
"Decode" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    RESULTS_DIR,
    ensure_checkpoint,
    machine,
    machine_line,
    matmul_peak,
    update_results_md,
)

CASES = [("greedy", 1, 1), ("greedy", 8, 1), ("beam 4", 1, 4), ("beam 4", 8, 4)]
MAX_LENGTH = 16
TARGETS = {("beam 4", 8): 2.0, ("greedy", 1): 2.0}  # vs transformers, from the issue


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, median of `repeats` later calls, last result)."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: random)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    directory = args.checkpoint or ensure_checkpoint()

    import jax.numpy as jnp
    import torch
    from transformers import VisionEncoderDecoderModel

    import nnx_caption as nc
    from nnx_caption import flops

    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    ours = nc.from_pretrained(directory)
    ref = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    peak = matmul_peak("float32")
    rows = []
    for mode, batch, beams in CASES:
        pixels = np.random.default_rng(batch).standard_normal((batch, 224, 224, 3), np.float32)
        kw = dict(max_length=MAX_LENGTH, min_length=MAX_LENGTH, num_beams=beams)
        first, ours_s, out = timed(
            lambda: nc.generate(ours, jnp.asarray(pixels), **kw), args.repeats
        )
        torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        with torch.no_grad():
            ref.generate(pixel_values=torch_pixels, **kw)  # warm-up
            _, ref_s, ref_out = timed(
                lambda: ref.generate(pixel_values=torch_pixels, **kw), args.repeats
            )
        work = flops.generate(ours.config, batch, beams, MAX_LENGTH)
        rows.append(
            dict(
                mode=mode,
                batch=batch,
                beams=beams,
                gflop=work / 1e9,
                nnx_s=ours_s,
                torch_s=ref_s,
                compile_s=first - ours_s,
                nnx_captions_per_s=batch / ours_s,
                torch_captions_per_s=batch / ref_s,
                speedup=ref_s / ours_s,
                nnx_peak_fraction=work / ours_s / peak,
                torch_peak_fraction=work / ref_s / peak,
                tokens_identical=bool(np.array_equal(out.sequences, ref_out.numpy())),
                target=TARGETS.get((mode, batch)),
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    command = " ".join([".venv/bin/python", "benchmarks/decode.py", *sys.argv[1:]])
    result = dict(
        machine=machine(),
        fp32_matmul_peak_gflops=peak / 1e9,
        max_length=MAX_LENGTH,
        command=command,
        cases=rows,
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "decode.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(rows)
    print(md)
    if not args.no_md:
        update_results_md(
            "Decode",
            (
                f"## Decode\n\n{machine_line(result['machine'])} Measured fp32 matmul peak "
                f"{peak / 1e9:.0f} GFLOP/s.\n\nCommand: `{command}`\n\n{md}\n\n"
                f"ViT-B/16 + GPT-2 small, random weights, fp32, max_length {MAX_LENGTH} with EOS "
                "suppressed; medians after a warm-up; compile time is nnx-caption's first call "
                "minus a steady one. GFLOP is the analytic count of one search "
                "(nnx_caption/flops.py); % of peak = GFLOP / seconds / measured matmul peak.\n"
            ),
        )


def table(rows: list[dict]) -> str:
    lines = [
        "| search | batch | GFLOP | nnx-caption captions/s | transformers captions/s | "
        "speedup | target | nnx % of peak | torch % of peak | compile s | same tokens |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        target = f">= {r['target']:.1f}x" if r["target"] else ""
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['gflop']:.0f} | {r['nnx_captions_per_s']:.2f} | "
            f"{r['torch_captions_per_s']:.2f} | {r['speedup']:.2f}x | {target} | "
            f"{100 * r['nnx_peak_fraction']:.0f}% | {100 * r['torch_peak_fraction']:.0f}% | "
            f"{r['compile_s']:.1f} | {'yes' if r['tokens_identical'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
