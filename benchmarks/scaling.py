"""How nnx-caption's step and decode times scale: a table and a PNG plot.

    .venv/bin/python benchmarks/scaling.py [--repeats 3] [--dtype float32|bfloat16] [--quick]

ViT-B/16 (224) + GPT-2 small with random weights (benchmarks/.cache), in this one process:
  - train step (forward, backward, AdamW) vs batch size 1..32 at target length 32, and vs
    target length 16..128 at batch 8;
  - generate() vs beams 1..8 at batch 8 and max_length 16, and vs max_length 8..64 with beam 4
    at batch 8 (EOS suppressed, so every run decodes the full length).
Each point is the median of --repeats calls after a warm-up call (compilation excluded), with
its analytic GFLOP (nnx_caption/flops.py) and fraction of the device's peak (common.peak_flops).
--quick keeps each sweep's ends and middle. The train step scans over layers (the same speed,
a third of the compile time). Results: benchmarks/results/scaling.json, scaling.png and the
"Scaling" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from common import (
    HERE,
    RESULTS_DIR,
    ensure_checkpoint,
    machine,
    machine_line,
    peak_flops,
    timed,
    update_results_md,
)
from train_step import train_inputs

SWEEPS = {  # name -> (what varies, its values, the fixed settings)
    "train vs batch": ("batch", [1, 2, 4, 8, 16, 32], dict(length=32)),
    "train vs target length": ("length", [16, 32, 64, 128], dict(batch=8)),
    "decode vs beams": ("beams", [1, 2, 4, 8], dict(batch=8, max_length=16)),
    "decode vs max_length": ("max_length", [8, 16, 32, 64], dict(batch=8, beams=4)),
}
QUICK = {"batch": [1, 8, 32], "length": [16, 128], "beams": [1, 8], "max_length": [8, 64]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer points per sweep")
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw scaling.png from results/scaling.json"
    )
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads((RESULTS_DIR / "scaling.json").read_text())
        title = f"nnx-caption, {saved['dtype']}, {saved['machine']['cpu']}"
        plot(saved["points"], HERE / "scaling.png", title)
        return
    directory = ensure_checkpoint()

    import jax
    import jax.numpy as jnp

    import nnx_caption as nc
    from nnx_caption import flops
    from nnx_caption.config import read_config
    from nnx_caption.layers import Execution
    from nnx_caption.train import TrainConfig, Trainer

    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    config = read_config(directory)
    peak, peak_source = peak_flops(args.dtype)
    model = nc.from_pretrained(directory, dtype)
    scanned = nc.from_pretrained(directory, dtype, execution=Execution(scan=True))
    trainer = Trainer(scanned, TrainConfig(total_steps=10_000))
    rows = []
    for sweep, (knob, values, fixed) in SWEEPS.items():
        for value in QUICK[knob] if args.quick else values:
            s = dict(fixed, **{knob: value})
            if sweep.startswith("train"):
                batch = train_inputs(
                    s["batch"], s["length"], config.decoder.vocab_size, 0, seed=s["batch"]
                )
                batch["labels"] = np.maximum(batch["labels"], 0)
                seconds = timed(
                    lambda: jax.block_until_ready(trainer.train_step(batch)["loss"]), args.repeats
                )[1]
                work = flops.train_step(config, s["batch"], s["length"])
            else:
                rng = np.random.default_rng(s["batch"])
                pixels = jnp.asarray(rng.standard_normal((s["batch"], 224, 224, 3), np.float32))
                kw = dict(max_length=s["max_length"], min_length=s["max_length"])
                seconds = timed(
                    lambda: nc.generate(model, pixels, num_beams=s["beams"], **kw), args.repeats
                )[1]
                work = flops.generate(config, s["batch"], s["beams"], s["max_length"])
            rows.append(
                dict(sweep=sweep, knob=knob, value=value, settings=s, seconds=seconds,
                     gflop=work / 1e9, peak_fraction=work / seconds / peak)
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    command = " ".join([".venv/bin/python", "benchmarks/scaling.py", *sys.argv[1:]])
    result = dict(
        machine=machine(), dtype=args.dtype, peak_gflops=peak / 1e9, peak_source=peak_source,
        command=command,
        points=rows,
    )  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, HERE / "scaling.png", f"nnx-caption, {args.dtype}, {machine()['cpu']}")
    md = table(rows)
    print(md)
    if not args.no_md:
        update_results_md(
            "Scaling",
            (
                f"## Scaling\n\n{machine_line(result['machine'])} Compute {args.dtype}; peak "
                f"{peak / 1e9:.0f} GFLOP/s ({peak_source}).\n\nCommand: `{command}`\n\n{md}\n\n"
                "![scaling](scaling.png)\n\nViT-B/16 + GPT-2 small, random weights; each point "
                f"the median of {args.repeats} calls after a warm-up (compilation excluded). "
                "Train = forward + backward + AdamW; decode = generate() with EOS suppressed.\n"
            ),
        )


def table(rows: list[dict]) -> str:
    lines = [
        "| sweep | settings | seconds | GFLOP | GFLOP/s | % of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        lines.append(
            f"| {r['sweep']} | {settings} | {r['seconds']:.3f} | {r['gflop']:.0f} | "
            f"{r['gflop'] / r['seconds']:.0f} | {100 * r['peak_fraction']:.0f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str) -> None:
    """One panel per sweep: seconds (left axis; log x) and % of peak (right axis)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        points = [r for r in rows if r["sweep"] == sweep]
        x = [r["value"] for r in points]
        ax.plot(x, [r["seconds"] for r in points], "o-", color="tab:blue")
        ax.set(xscale="log", xlabel=points[0]["knob"], title=sweep, ylim=(0, None))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no 10^k labels
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_ylabel("seconds", color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, [100 * r["peak_fraction"] for r in points], "s--", color="tab:orange")
        twin.set_ylim(0, 100)
        twin.set_ylabel("% of matmul peak", color="tab:orange")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
