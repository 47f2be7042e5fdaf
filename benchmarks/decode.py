"""Captioning throughput: nnx-caption generate() vs transformers' generate() (PyTorch, CPU) and
HF's FlaxVisionEncoderDecoderModel.generate() (transformers 4.57, jitted).

    .venv/bin/python benchmarks/decode.py [--checkpoint DIR] [--repeats 3] [--no-flax]

ViT-B/16 (224) + GPT-2 small with random weights (benchmarks/.cache, written once), fp32,
greedy and beam 4 at batch 1 and 8, max_length 16 with EOS suppressed (min_length 16) so every
run decodes the full length. nnx-caption and transformers run in this one process on the same
images, one after the other; HF Flax runs in its own process and virtual environment
(peers/hf_flax.py, set up by peers/setup_hf_flax.sh on first use). Each figure is the median
of --repeats runs after a warm-up run; compile time (first call minus a steady call) is
reported apart. Work is counted analytically (nnx_caption.flops.generate) and reported against
the device's fp32 peak (common.peak_flops). Tokens are checked identical across the peers.
Results: benchmarks/results/decode.json and the "Decode" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from common import (
    RESULTS_DIR,
    ensure_checkpoint,
    machine,
    machine_line,
    peak_flops,
    run_hf_flax,
    timed,
    update_results_md,
    write_inputs,
)

CASES = [("greedy", 1, 1), ("greedy", 8, 1), ("beam 4", 1, 4), ("beam 4", 8, 4)]
MAX_LENGTH = 16
# Speedups the issues ask for: vs transformers (PyTorch) and vs HF Flax.
TARGETS = {("beam 4", 8): 2.0, ("greedy", 1): 2.0}
FLAX_TARGETS = {("beam 4", 8): 2.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: random)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--no-flax", action="store_true", help="skip the HF Flax peer")
    args = parser.parse_args()
    directory = args.checkpoint or ensure_checkpoint()

    import torch
    from transformers import VisionEncoderDecoderModel

    import nnx_caption as nc
    from nnx_caption import bench, flops

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    ours = nc.from_pretrained(directory)
    ref = VisionEncoderDecoderModel.from_pretrained(directory).eval()
    peak, peak_source = peak_flops("float32")
    rows = []
    for mode, batch, beams in CASES:
        pixels = np.random.default_rng(batch).standard_normal((batch, 224, 224, 3), np.float32)
        kw = dict(max_length=MAX_LENGTH, min_length=MAX_LENGTH, num_beams=beams)
        knobs = bench.BenchArgs(num_beams=beams, max_length=MAX_LENGTH, steps=args.repeats)
        r = bench.bench_decode(ours, knobs, None, pixels)  # `nnx-caption bench`'s own timing
        first, ours_s, out = r["first_call_s"], r["step_time_s"], r["sequences"]
        torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        with torch.no_grad():
            ref.generate(pixel_values=torch_pixels, **kw)  # warm-up
            _, ref_s, ref_out = timed(
                lambda: ref.generate(pixel_values=torch_pixels, **kw), args.repeats
            )
        work = flops.generate(ours.config, batch, beams, MAX_LENGTH)
        flax = None
        if not args.no_flax:  # its own process and virtual environment
            inputs = write_inputs(f"decode_b{batch}", dict(pixel_values=pixels))
            flax = run_hf_flax(
                "decode", directory, inputs, beams=beams, max_length=MAX_LENGTH,
                repeats=args.repeats,
            )  # fmt: skip
        rows.append(
            dict(
                mode=mode,
                batch=batch,
                beams=beams,
                gflop=work / 1e9,
                nnx_s=ours_s,
                torch_s=ref_s,
                flax_s=flax and flax["median_s"],
                compile_s=first - ours_s,
                flax_compile_s=flax and flax["first_s"] - flax["median_s"],
                nnx_captions_per_s=batch / ours_s,
                torch_captions_per_s=batch / ref_s,
                flax_captions_per_s=flax and batch / flax["median_s"],
                speedup=ref_s / ours_s,
                flax_speedup=flax and flax["median_s"] / ours_s,
                nnx_peak_fraction=work / ours_s / peak,
                torch_peak_fraction=work / ref_s / peak,
                flax_peak_fraction=flax and work / flax["median_s"] / peak,
                tokens_identical=bool(np.array_equal(out, ref_out.numpy())),
                flax_tokens_identical=flax
                and bool(np.array_equal(out, np.asarray(flax["sequences"]))),
                target=TARGETS.get((mode, batch)),
                flax_target=FLAX_TARGETS.get((mode, batch)),
            )
        )
        print(json.dumps(rows[-1]), flush=True)

    command = " ".join([".venv/bin/python", "benchmarks/decode.py", *sys.argv[1:]])
    result = dict(
        machine=machine(),
        peak_gflops=peak / 1e9,
        peak_source=peak_source,
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
                f"## Decode\n\n{machine_line(result['machine'])} Peak "
                f"{peak / 1e9:.0f} GFLOP/s ({peak_source}).\n\nCommand: `{command}`\n\n{md}\n\n"
                f"ViT-B/16 + GPT-2 small, random weights, fp32, max_length {MAX_LENGTH} with EOS "
                "suppressed; medians after a warm-up; compile time is a peer's first call "
                "minus a steady one. GFLOP is the analytic count of one search "
                "(nnx_caption/flops.py); % of peak = GFLOP / seconds / measured matmul peak.\n"
            ),
        )


def table(rows: list[dict]) -> str:
    def opt(value, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        "| search | batch | GFLOP | nnx-caption captions/s | transformers captions/s | "
        "HF Flax captions/s | vs transformers | vs HF Flax | nnx % of peak | torch % of peak | "
        "HF Flax % of peak | compile s (nnx / HF Flax) | same tokens (torch / HF Flax) |",
        "| --- |" + " ---: |" * 11 + " --- |",
    ]
    yes = {True: "yes", False: "NO", None: "-"}
    for r in rows:
        vs_torch = f"{r['speedup']:.2f}x" + (f" (>= {r['target']:.1f}x)" if r["target"] else "")
        vs_flax = opt(r["flax_speedup"], ".2f") + ("x" if r["flax_speedup"] else "")
        if r["flax_target"] and r["flax_speedup"]:
            vs_flax += f" (>= {r['flax_target']:.1f}x)"
        flax_peak = opt(r["flax_peak_fraction"] and 100 * r["flax_peak_fraction"], ".0f")
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['gflop']:.0f} | {r['nnx_captions_per_s']:.2f} | "
            f"{r['torch_captions_per_s']:.2f} | {opt(r['flax_captions_per_s'], '.2f')} | "
            f"{vs_torch} | {vs_flax} | {100 * r['nnx_peak_fraction']:.0f}% | "
            f"{100 * r['torch_peak_fraction']:.0f}% | {flax_peak}{'%' if flax_peak else ''} | "
            f"{r['compile_s']:.1f} / {opt(r['flax_compile_s'], '.1f')} | "
            f"{yes[r['tokens_identical']]} / {yes[r['flax_tokens_identical']]} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
