"""Peak resident memory while loading a full-size checkpoint: nnx-caption vs transformers.

    .venv/bin/python benchmarks/load_memory.py [--checkpoint DIR] [--trace]

Without --checkpoint it loads a random ViT-B/16 (224) + GPT-2 small checkpoint, the shape of
nlpconnect/vit-gpt2-image-captioning, written once by transformers' save_pretrained into
benchmarks/.cache/vit-gpt2-random (fp32 safetensors, ~0.96 GB) and reused after. Each library
loads in a fresh subprocess, so one's peak cannot hide in the other's, and reports:

- baseline: RSS after importing the library and running one tiny op (so runtime start-up,
  e.g. XLA's CPU client or torch's kernels, is not charged to loading);
- peak: ru_maxrss after loading (the high-water mark of RSS, KiB on Linux); it counts touched
  pages of memory-mapped files too, which is why nnx-caption reads tensors instead of mmapping;
- delta = peak - baseline, and delta / checkpoint size (sum of *.safetensors on disk).

Target: nnx-caption's delta <= 1.5x the checkpoint's size. Results go to
benchmarks/results/load_memory.json and the "Load memory" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ensure_checkpoint, machine, machine_line, update_results_md

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "load_memory.json"
TARGET = 1.5  # nnx-caption's delta / checkpoint size, from the issue
MIB = 1024 * 1024


def rss_bytes() -> int:
    """Current RSS from /proc (no psutil needed in the children)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def file_backed_bytes() -> int:
    """RssFile: resident pages of mapped files (libraries and, for mmap loaders, weights)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssFile:"))
    return int(line.split()[1]) * 1024


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# Children: each runs in its own interpreter and prints one JSON line. ---------------------------


def child_nnx(directory: str, trace: bool, edited: bool = False, unchecked: bool = False) -> dict:
    """edited: the worked edit (examples/gated_cross_attention.py), its gated cross-attention
    new: the stock parameters stream in, the new ones are initialised alone. unchecked:
    allow_nonfinite=True, which skips the NaN/Inf check (its time is the difference)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import nnx_caption as nc

    jax.devices()
    jnp.ones(4).sum().block_until_ready()  # starts the CPU client and compiles once
    baseline, baseline_peak, file_baseline = rss_bytes(), peak_bytes(), file_backed_bytes()
    if trace:  # RSS after each tensor lands: wraps device_put here, the package is untouched
        put = jax.device_put

        def traced_put(x, *args, **kwargs):
            out = put(x, *args, **kwargs)
            print(
                f"[trace] {str(x.shape):>20} {x.nbytes / MIB:8.1f} MiB  "
                f"rss {rss_bytes() / MIB:8.1f}  peak {peak_bytes() / MIB:8.1f}",
                file=sys.stderr,
            )
            return out

        jax.device_put = traced_put
    kwargs = dict(allow_nonfinite=True) if unchecked else {}
    if edited:
        from nnx_caption.edits import load_class

        example = HERE.parent / "examples" / "gated_cross_attention.py"
        cls = load_class(f"{example}:GatedCaptioner")
        kwargs = dict(model_cls=cls, new_params=sys.modules[cls.__module__].NEW_PARAMS)
    start = time.perf_counter()
    model = nc.from_pretrained(directory, **kwargs)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    result = dict(
        baseline=baseline,
        baseline_peak=baseline_peak,
        peak=peak_bytes(),
        after=rss_bytes(),
        file_baseline=file_baseline,
        file_after=file_backed_bytes(),
        seconds=seconds,
        param_bytes=sum(p.nbytes for p in params),
    )
    if unchecked:  # after the peak is taken: the check alone, tensor by tensor
        result["check_seconds"] = time_nonfinite_check(directory)
    return result


def time_nonfinite_check(directory: str) -> float:
    """Seconds that the NaN/Inf check of every tensor takes, reads not counted."""
    from nnx_caption.safetensors_io import SafetensorsReader, check_finite

    total = 0.0
    for file in glob.glob(os.path.join(directory, "*.safetensors")):
        with SafetensorsReader(file) as reader:
            for key in reader.entries:
                array = reader.read(key, allow_nonfinite=True)
                start = time.perf_counter()
                check_finite(key, array)
                total += time.perf_counter() - start
    return total


def child_transformers(directory: str, trace: bool) -> dict:
    import torch
    from transformers import VisionEncoderDecoderModel

    torch.ones(4).sum().item()
    baseline, baseline_peak, file_baseline = rss_bytes(), peak_bytes(), file_backed_bytes()
    start = time.perf_counter()
    model = VisionEncoderDecoderModel.from_pretrained(directory)
    # Touch every parameter, the counterpart of block_until_ready: weights still backed by the
    # mmap would otherwise only count once first used.
    with torch.no_grad():
        params = list(model.parameters())
        for p in params:
            p.sum()
    seconds = time.perf_counter() - start
    return dict(
        baseline=baseline,
        baseline_peak=baseline_peak,
        peak=peak_bytes(),
        after=rss_bytes(),
        file_baseline=file_baseline,
        file_after=file_backed_bytes(),
        seconds=seconds,
        param_bytes=sum(p.numel() * p.element_size() for p in params),
    )


CHILDREN = {
    "nnx-caption": child_nnx,
    "nnx-caption, edited (gated x-attn new)": lambda d, t: child_nnx(d, t, edited=True),
    "nnx-caption, allow_nonfinite (no NaN/Inf check)": lambda d, t: child_nnx(d, t, unchecked=True),
    "transformers": child_transformers,
}


# Parent: orchestrates, never imports jax or torch. -------------------------------------------


def run_child(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    sys.stderr.write("".join(s + "\n" for s in proc.stderr.splitlines() if "[trace]" in s))
    if proc.returncode != 0:
        sys.exit(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def checkpoint_bytes(directory: Path) -> int:
    files = glob.glob(str(directory / "*.safetensors"))
    if not files:
        sys.exit(f"{directory}: no *.safetensors files")
    return sum(os.path.getsize(f) for f in files)


def warm_page_cache(directory: Path) -> None:
    """Read the files once so both loaders see a warm page cache (times then compare)."""
    for f in glob.glob(str(directory / "*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * MIB):
                pass


def table(rows: dict[str, dict], size: int) -> str:
    lines = [
        "| loader | baseline MiB | peak MiB | delta MiB | delta / checkpoint "
        "| file-backed growth MiB | load s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['baseline'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
            f"{r['delta'] / MIB:.0f} | {r['delta'] / size:.2f}x | "
            f"{(r['file_after'] - r['file_baseline']) / MIB:.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: random)")
    parser.add_argument("--trace", action="store_true", help="print nnx-caption RSS per tensor")
    parser.add_argument("--no-md", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # index into CHILDREN
    args = parser.parse_args()
    if args.child is not None:
        child = list(CHILDREN.values())[args.child]
        print(json.dumps(child(str(args.checkpoint), args.trace)))
        return

    directory = args.checkpoint or ensure_checkpoint()
    size = checkpoint_bytes(directory)
    warm_page_cache(directory)

    rows: dict[str, dict] = {}
    for index, name in enumerate(CHILDREN):
        extra = ["--trace"] if args.trace and name == "nnx-caption" else []
        out = run_child("--child", str(index), "--checkpoint", str(directory), *extra)
        r = json.loads(out.strip().splitlines()[-1])
        r["delta"] = r["peak"] - r["baseline"]
        rows[name] = r

    nnx, hf = rows["nnx-caption"], rows["transformers"]
    edited = rows["nnx-caption, edited (gated x-attn new)"]
    unchecked = rows["nnx-caption, allow_nonfinite (no NaN/Inf check)"]
    check_seconds = unchecked["check_seconds"]
    ratio, vs_hf = nnx["delta"] / size, nnx["delta"] / hf["delta"]
    edited_ratio = edited["delta"] / size
    passed = max(ratio, edited_ratio) <= TARGET
    command = " ".join([".venv/bin/python", "benchmarks/load_memory.py", *sys.argv[1:]])
    result = dict(
        checkpoint=str(directory),
        checkpoint_bytes=size,
        target_ratio=TARGET,
        nnx_over_checkpoint=ratio,
        nnx_over_transformers=vs_hf,
        edited_over_checkpoint=edited_ratio,
        nonfinite_check_seconds=check_seconds,
        passed=passed,
        machine=machine(),
        command=command,
        loaders=rows,
    )
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")

    md = table(rows, size)
    verdict = "PASS" if passed else "FAIL"
    summary = (
        f"checkpoint {size / MIB:.0f} MiB on disk ({directory.name}); "
        f"nnx-caption delta / checkpoint = {ratio:.2f}x, edited {edited_ratio:.2f}x (its "
        f"model holds {edited['param_bytes'] / MIB:.0f} MiB of parameters) (target <= "
        f"{TARGET}x: {verdict}); nnx-caption delta / transformers delta = {vs_hf:.2f}x; "
        f"the NaN/Inf check, timed alone, takes {check_seconds:.2f} s of the "
        f"{nnx['seconds']:.2f} s load"
    )
    print(md + "\n\n" + summary)
    if not args.no_md:
        update_results_md(
            "Load memory",
            "## Load memory\n\n"
            f"{machine_line(result['machine'])}\n\n"
            f"Command: `{command}`\n\n{md}\n\n{summary}.\n\n"
            "Peak is ru_maxrss of a fresh process per loader; baseline is RSS after import and "
            "one tiny op. File-backed growth is RssFile after load minus before: pages of a "
            "memory-mapped checkpoint counted in RSS (page cache, shared and reclaimable), "
            "as opposed to anonymous memory the process owns.\n",
        )
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
