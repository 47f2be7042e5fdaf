"""Where a train step's time goes: a jax profiler trace plus a per-op summary.

    .venv/bin/python benchmarks/profile_step.py [--batch 8] [--length 32] [--dtype bfloat16]
        [--scan]

Traces one train step of ViT-B/16 + GPT-2 small (random weights, benchmarks/.cache) after two
warm-up steps. The trace is written to benchmarks/results/profile/ (open it with TensorBoard's
profile plugin, xprof or Perfetto); the summary maps each executed XLA op back to the JAX
operation it came from (its op_name metadata in the compiled HLO) and adds up time per kind:
matmuls (dot_general), elementwise work, reductions, transposes. On CPU the times are thread
time, summed over XLA's worker threads; comparing their sum with the wall time shows how much
of the machine sat idle.
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import numpy as np
from common import RESULTS_DIR, ensure_checkpoint
from train_step import train_inputs


def op_kinds(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the last component of its JAX op_name (e.g. dot_general)."""
    kinds = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            kinds[m.group(1)] = re.sub(r"\[.*", "", m.group(2).split("/")[-1])
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--scan", action="store_true", help="scan over layers")
    parser.add_argument("--top", type=int, default=15, help="rows of the summary")
    args = parser.parse_args()
    directory = ensure_checkpoint()

    import jax
    import jax.numpy as jnp

    import nnx_caption as nc
    from nnx_caption.train import TrainConfig, Trainer

    dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
    from nnx_caption.layers import Execution

    model = nc.from_pretrained(directory, dtype, execution=Execution(scan=args.scan))
    trainer = Trainer(model, TrainConfig(total_steps=1000))
    config = trainer.model.config
    batch = train_inputs(args.batch, args.length, config.decoder.vocab_size, 0)
    batch["labels"] = np.maximum(batch["labels"], 0)
    for _ in range(2):
        jax.block_until_ready(trainer.train_step(batch)["loss"])
    out = RESULTS_DIR / "profile"
    t = time.perf_counter()
    with jax.profiler.trace(str(out)):
        jax.block_until_ready(trainer.train_step(batch)["loss"])
    wall = time.perf_counter() - t

    hlo = trainer._step.lower(
        trainer.state, trainer.put(batch), jnp.int32(0), jnp.int32(0)
    ).compile()
    kinds = op_kinds(hlo.as_text())
    trace = sorted(out.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)[-1]
    spent = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(str(trace)).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in kinds:
                    spent[kinds[event.name]] += event.duration_ns / 1e9
    busy = sum(spent.values())
    print(f"one step: {wall:.2f} s wall; XLA ops: {busy:.2f} s of thread time")
    print(f"trace: {trace}\n\n| op | thread s | share |\n| --- | ---: | ---: |")
    for kind, seconds in spent.most_common(args.top):
        print(f"| {kind} | {seconds:.3f} | {100 * seconds / busy:.1f}% |")


if __name__ == "__main__":
    main()
