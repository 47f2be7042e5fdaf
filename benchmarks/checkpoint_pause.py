"""How long a checkpoint save stops training: orbax async (what `train` does) vs blocking,
and what the checksums cost at save and at restore.

    .venv/bin/python benchmarks/checkpoint_pause.py [--preset vit_gpt2_base] [--repeats 3]

The (model, optimizer) state of the preset (random weights: ViT-B/16 + GPT-2 small by
default, with AdamW's two moments) is saved by `Trainer.save` into a fresh folder:
- async (block=False): the step loop's pause is the time until save returns (the checksums and
  the NaN/Inf check computed on the devices, the arrays copied off them; then written by a
  background thread); the write is timed apart;
- sync (block=True): the pause is the whole write;
- checksums: `checkpointing.fingerprint` alone on the same state (compiled; what a save and a
  restore each add), and a whole `Trainer.restore` (read, checked, verified) beside it.
Medians of --repeats of each; results go to benchmarks/results/checkpoint_pause.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, machine_line

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "checkpoint_pause.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit_gpt2_base")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax

    from nnx_caption import config as config_lib
    from nnx_caption.checkpointing import fingerprint
    from nnx_caption.hf import init_model
    from nnx_caption.train import TrainConfig, Trainer

    trainer = Trainer(init_model(getattr(config_lib, args.preset)()), TrainConfig())
    nbytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state))
    fingerprint(trainer.state)  # compiled once, as a run's first save compiles it
    times: dict[str, list[float]] = {
        "async_pause": [], "async_total": [], "sync_pause": [], "checksums": [], "restore": []
    }  # fmt: skip
    root = tempfile.mkdtemp(dir=HERE / ".cache" if (HERE / ".cache").is_dir() else None)
    try:
        for i in range(args.repeats):
            for mode in ("async", "sync"):
                folder = os.path.join(root, f"{mode}{i}")
                start = time.perf_counter()
                saved = trainer.save(folder, block=mode == "sync")
                times[f"{mode}_pause"].append(time.perf_counter() - start)
                if mode == "async":
                    trainer.wait()
                    times["async_total"].append(time.perf_counter() - start)
                else:
                    start = time.perf_counter()
                    trainer.restore(saved)
                    times["restore"].append(time.perf_counter() - start)
                shutil.rmtree(folder)
            start = time.perf_counter()
            fingerprint(trainer.state)
            times["checksums"].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "preset": args.preset,
        "state_gib": nbytes / 2**30,
        **{f"{k}_s": statistics.median(v) for k, v in times.items()},
        "runs": times,
        "machine": machine(),
        "command": f"benchmarks/checkpoint_pause.py --preset {args.preset} "
        f"--repeats {args.repeats}",
    }
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    print(machine_line(result["machine"]))
    print(
        f"{args.preset}: state {result['state_gib']:.2f} GiB; the step loop pauses "
        f"{result['async_pause_s']:.2f} s for an async save (written in "
        f"{result['async_total_s']:.2f} s in the background) and {result['sync_pause_s']:.2f} s "
        f"for a blocking one; the checksums (and NaN/Inf check) take {result['checksums_s']:.2f} "
        f"s of each save, and again of a restore, which takes {result['restore_s']:.2f} s in all"
    )


if __name__ == "__main__":
    main()
