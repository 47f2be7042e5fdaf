"""What donating the train state saves, for people who write their own NNX step around the model.

    .venv/bin/python benchmarks/donation.py [--preset vit_gpt2_base] [--batch 8] [--repeats 3]

One step = forward, backward and AdamW update (the Trainer's own step function), jitted over
nnx.split state two ways in one process: without donation (XLA keeps the old parameters and
optimizer state alive beside the new ones and copies) and with `donate_argnums=0` (as Trainer
does). Random weights, batch of `--batch` images with 32 target tokens. Prints the median step
time of each after one compiling call and one warm-up; writes benchmarks/results/donation.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_caption import bench, config
from nnx_caption.loading import init_model
from nnx_caption.train import TrainConfig, _train_step, make_optimizer

RESULTS = Path(__file__).parent / "results" / "donation.json"


def timed_steps(donate: bool, preset: str, batch: dict, repeats: int) -> list[float]:
    model = init_model(getattr(config, preset)(), seed=0)
    cfg = TrainConfig(total_steps=1000)
    graphdef, state = nnx.split((model, make_optimizer(model, cfg)))
    step = jax.jit(
        functools.partial(_train_step, graphdef, cfg=cfg), donate_argnums=(0,) if donate else ()
    )
    times, bad = [], jnp.int32(0)
    for i in range(repeats + 2):  # the compiling call and a warm-up are left out
        start = time.perf_counter()
        state, metrics, bad = step(state, batch, jnp.int32(i), bad)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vit_gpt2_base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_config = getattr(config, args.preset)()
    batch = {
        k: jnp.asarray(v)
        for k, v in bench.train_batch(model_config, args.batch, 32, 1, seed=0).items()
    }
    results = {}
    for donate in (False, True):
        times = timed_steps(donate, args.preset, batch, args.repeats)
        results["donated" if donate else "not donated"] = statistics.median(times)
        print(f"{'donated' if donate else 'not donated'}: {statistics.median(times):.2f} s/step")
    ratio = results["not donated"] / results["donated"]
    print(f"donation: {ratio:.2f}x faster ({jax.devices()[0].device_kind})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(dict(vars(args), **results, speedup=ratio), indent=2) + "\n")


if __name__ == "__main__":
    main()
