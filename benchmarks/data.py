"""Images/s decoded and resized (to the model's 224x224, as ImageProcessor does) from COCO-sized
JPEGs, against the number of worker processes: nnx-caption's batch stream for a split that is
not cached (`ImageStore.stream`: grain's `mp_prefetch` workers, one thread each, tasks of one
batch) against grain's defaults for the same job (`MapDataset.map(decode).batch(32)`,
`mp_prefetch`, a pool of threads in each worker), in one run on the same files.

    .venv/bin/python benchmarks/data.py [--images 256] [--workers 0 2 4] [--repeats 4] [--rounds 3]

The JPEGs are generated once into benchmarks/.cache/jpegs: 640x480, quality 90, smooth colour
fields with noise, about COCO's average file size (~160 KB), read once into the page cache.
Each configuration runs twice from its start (its workers' included), over 1 pass of every
file and over 1 + --repeats passes: the difference gives the steady images/s (the start and
any read-ahead cancel), the rest the start-up time; the two take turns for --rounds rounds and
each figure is the median. Workers 0 is decoding in this process (nnx-caption: one thread;
grain's default read options: a pool of threads). The last lines turn the rate into the
workers that a device needs: a step's examples/s at an assumed MFU, from the analytic FLOPs of
ViT-B/16 + GPT-2 (target length 32), divided by the images/s of one core (nnx-caption's
workers-0 figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from common import machine, machine_line, update_results_md
from PIL import Image

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "jpegs"
RESULTS_JSON = HERE / "results" / "data.json"
DEVICES = {"NVIDIA H200": 989e12}  # bf16 dense peak, nnx_caption.bench.PEAKS


def make_jpegs(n: int) -> list[str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = CACHE / f"{i:05d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(i)
            y, x = np.mgrid[0:480, 0:640] / 640.0
            phases = rng.uniform(0, 6.3, (3, 2))
            field = np.stack([np.sin(7 * x + a) * np.cos(5 * y + b) for a, b in phases], -1)
            noise = rng.normal(0, 18, (480, 640, 3))
            rgb = np.clip(128 + 100 * field + noise, 0, 255).astype(np.uint8)
            Image.fromarray(rgb).save(path, quality=90)
        paths.append(str(path))
    return paths


def ours(paths: list[str], processor, workers: int, passes: int) -> float:
    """Seconds for `passes` passes of batches of 32 through ImageStore.stream, uncached (the
    training path of a split that does not fit), from the store's start (its workers')."""
    from nnx_caption.data import ImageStore

    start = time.perf_counter()
    store = ImageStore(paths, processor, workers, cache=False)
    order = np.concatenate([np.arange(len(paths))] * passes)
    batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    count = sum(len(pixels) for pixels, failed in store.stream(batches) if not failed.any())
    assert count == passes * len(paths)
    return time.perf_counter() - start


def _grain_decode(path: str, processor=None) -> np.ndarray:
    from nnx_caption.data.images import _decode

    return _decode(path, processor)


def grain_seconds(paths: list[str], processor, workers: int, passes: int) -> float:
    """Seconds for one pipeline of grain's defaults over `passes` passes, from its start (its
    workers') to its last batch. With no workers: in this process, threads."""
    import functools

    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its settings from absl flags
        flags.FLAGS.mark_as_parsed()
    decode = functools.partial(_grain_decode, processor=processor)
    start = time.perf_counter()
    dataset = grain.MapDataset.source(paths).repeat(passes).map(decode).batch(32)
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    batches = dataset.to_iter_dataset()
    batches = batches.mp_prefetch(options) if workers else batches
    count = sum(len(b) for b in batches)
    assert count == passes * len(paths)
    return time.perf_counter() - start


def rates(seconds, paths: list[str], processor, workers: int, passes: int) -> dict:
    """Steady images/s and start-up seconds from a run of 1 pass and one of 1 + passes: the
    difference cancels the start and whatever was read ahead."""
    one = seconds(paths, processor, workers, 1)
    more = seconds(paths, processor, workers, 1 + passes)
    per_pass = (more - one) / passes
    return {"images_per_s": len(paths) / per_pass, "start_s": max(one - per_pass, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed, for the device lines")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    # 0: decoded in this process.
    workers = args.workers or sorted({0, 2, cores} | ({4} if cores >= 4 else set()))

    from nnx_caption import config as config_lib
    from nnx_caption import flops
    from nnx_caption.processing import ImageProcessor

    processor = ImageProcessor(size=224)
    paths = make_jpegs(args.images)
    for path in paths:  # into the page cache
        Path(path).read_bytes()
    size_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
    rows = []
    for w in workers:
        runs: dict[str, list[dict]] = {"nnx_caption": [], "grain": []}
        for _ in range(args.rounds):  # alternated: a shared machine's speed drifts
            runs["nnx_caption"].append(rates(ours, paths, processor, w, args.repeats))
            runs["grain"].append(rates(grain_seconds, paths, processor, w, args.repeats))
        row = {"workers": w, **{k: _median(v) for k, v in runs.items()}, "runs": runs}
        rows.append(row)
        line = f"{w} workers: nnx-caption {_rate(row['nnx_caption'])}"
        print(f"{line}; grain's defaults {_rate(row['grain'])}")

    per_worker = rows[0]["nnx_caption"]["images_per_s"]  # in this process: one core's rate
    example_flops = flops.train_step(config_lib.vit_gpt2_base(), 1, 32)
    needs = {}
    for device, peak in DEVICES.items():
        rate = peak * args.mfu / example_flops  # examples/s: images/s at one caption each
        needs[device] = {"examples_per_s": rate, "workers": rate / per_worker}
        print(
            f"{device} at {args.mfu:.0%} MFU: {rate:.0f} images/s (ViT-B/16 + GPT-2, one "
            f"caption each) = {rate / per_worker:.0f} workers at this CPU's "
            f"{per_worker:.0f} images/s each (fewer with --captions_per_image k, or once "
            "the split is cached)"
        )
    result = {
        "images": args.images,
        "jpeg_kb": size_kb,
        "rows": rows,
        "train_flops_per_example": example_flops,
        "mfu_assumed": args.mfu,
        "needs": needs,
        "machine": machine(),
        "command": f"benchmarks/data.py --images {args.images} --workers "
        + " ".join(map(str, workers))
        + f" --repeats {args.repeats} --rounds {args.rounds}",
    }
    RESULTS_JSON.parent.mkdir(exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    print(machine_line(result["machine"]), f"JPEGs 640x480, {size_kb:.0f} KB on average.")
    update_results_md("Data decoding", _section(result))


def _section(result: dict) -> str:
    lines = [
        "## Data decoding",
        "",
        f"`.venv/bin/python {result['command']}` ({machine_line(result['machine'])}): "
        f"{result['images']} generated 640x480 JPEGs ({result['jpeg_kb']:.0f} KB on average) "
        "decoded and resized to 224x224; steady images/s and start-up seconds, medians of the "
        "rounds, the two taking turns. nnx-caption: its batch stream of a split that is not "
        "cached (grain workers, one thread each); grain: its defaults (`map(decode).batch(32)`"
        ", `mp_prefetch`, threads in each worker).",
        "",
        "| workers | nnx-caption images/s | start | grain defaults images/s | start |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        ours_row, grain_row = row["nnx_caption"], row["grain"]
        lines.append(
            f"| {row['workers'] or '0 (this process)'} | {ours_row['images_per_s']:.0f} | "
            f"{ours_row['start_s']:.1f} s | {grain_row['images_per_s']:.0f} | "
            f"{grain_row['start_s']:.1f} s |"
        )
    for device, need in result["needs"].items():
        lines += [
            "",
            f"{device} at an assumed {result['mfu_assumed']:.0%} MFU trains "
            f"{need['examples_per_s']:.0f} examples/s of ViT-B/16 + GPT-2 (analytic FLOPs, "
            f"target length 32): {need['workers']:.0f} workers at this CPU's one-core rate, "
            "for a split decoded every epoch with one caption an image.",
        ]
    return "\n".join(lines)


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _rate(r: dict) -> str:
    return f"{r['images_per_s']:.0f} images/s after a {r['start_s']:.1f} s start"


if __name__ == "__main__":
    main()
