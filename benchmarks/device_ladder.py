"""The prepared accelerator run: a fixed, time-boxed ladder of `nnx-caption bench` runs.

    benchmarks/device.sh OUT [--smoke]       # installs, checks the accelerator, runs this
    python benchmarks/device_ladder.py OUT [--smoke] [--budget SECONDS]

The ladder, in order (each step skipped with a note once the budget is spent):
  1. the bf16 train step of ViT-B/16 + GPT-2 (preset vit_gpt2_base) at per-device batch 64,
     128 and 256, unrolled, then with --scan_layers; a step out of device memory is run again
     with --gradient_checkpointing (remat);
  2. --attention_impl cudnn against einsum at the best of those (most examples/s);
  3. greedy and beam-4 decoding at batch 64;
  4. one profiler trace of the best train step.
Every bench.json goes to OUT/<step>/, the table to OUT/results.md, the trace to OUT/trace/.
A persistent compilation cache (OUT/jax_cache, or $JAX_COMPILATION_CACHE_DIR) makes a second
run compile little. `--smoke` runs the same steps on the tiny preset (batches 2, 4, 8) on any
backend in under three minutes; the cudnn step is skipped with a note where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FULL = dict(preset="vit_gpt2_base", batches=(64, 128, 256), decode_batch=64, budget=480)
SMOKE = dict(preset="tiny", batches=(2, 4, 8), decode_batch=4, budget=170)
MIN_STEP_SECONDS = 20  # a step that cannot have this much left is skipped


@dataclass
class Step:
    name: str
    flags: list[str]
    result: dict | None = None  # the bench.json row
    note: str = ""
    seconds: float = 0.0
    extra: list[str] = field(default_factory=list)  # flags added on a retry (remat)


def bench(out: Path, step: Step, deadline: float, env: dict) -> None:
    """One `nnx-caption bench` run into out/<name>/, within the time left."""
    left = deadline - time.monotonic()
    if left < MIN_STEP_SECONDS:
        step.note = f"skipped: the ladder's time was spent ({left:.0f} s left)"
        return
    folder = out / step.name
    command = [sys.executable, "-m", "nnx_caption.cli", "bench", *step.flags, *step.extra]
    command += ["--output_dir", str(folder)]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
    except subprocess.TimeoutExpired:
        step.note = f"stopped after {left:.0f} s: the ladder's time was spent"
        return
    finally:
        step.seconds = time.monotonic() - start
    (out / f"{step.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        step.note = f"failed (exit {done.returncode}): {(lines or ['see the log'])[-1][:200]}"
        return
    step.result = json.loads((folder / "bench.json").read_text())[0]


def out_of_memory(out: Path, step: Step) -> bool:
    log = out / f"{step.name}.log"
    return log.exists() and "RESOURCE_EXHAUSTED" in log.read_text()


def ladder(out: Path, smoke: bool, budget: float) -> list[Step]:
    import jax  # here, not at the top: `--help` needs no backend

    shape = SMOKE if smoke else FULL
    gpu = jax.devices()[0].platform == "gpu"
    deadline = time.monotonic() + budget
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
    common = ["--preset", shape["preset"], "--dtype", "bfloat16", "--steps", "5", "--warmup", "1"]
    steps: list[Step] = []
    for scan in (False, True):
        for batch in shape["batches"]:
            name = f"train_b{batch}" + ("_scan" if scan else "")
            flags = [*common, "--what", "train", "--per_device_batch_size", str(batch)]
            step = Step(name, flags + (["--scan_layers"] if scan else []))
            bench(out, step, deadline, env)
            if step.result is None and out_of_memory(out, step):
                step.extra, step.note = ["--gradient_checkpointing"], ""
                bench(out, step, deadline, env)
            steps.append(step)
    trained = [s for s in steps if s.result]
    best = max(trained, key=lambda s: s.result["examples_per_s"]) if trained else None
    cudnn = Step("train_best_cudnn", [])
    if best is None:
        cudnn.note = "skipped: no train step ran"
    elif not gpu:
        cudnn.note = f"skipped: cuDNN needs an NVIDIA GPU (jax runs on {jax.default_backend()})"
    else:
        cudnn.flags = [*best.flags, *best.extra, "--attention_impl", "cudnn"]
        bench(out, cudnn, deadline, env)
    steps.append(cudnn)
    for beams in (1, 4):
        name = "decode_greedy" if beams == 1 else f"decode_beam{beams}"
        flags = [*common, "--what", "decode", "--per_device_batch_size", str(shape["decode_batch"])]
        step = Step(name, [*flags, "--num_beams", str(beams)])
        bench(out, step, deadline, env)
        steps.append(step)
    trace = Step("trace", [])
    if best is None:
        trace.note = "skipped: no train step ran"
    else:
        trace.flags = [*best.flags, *best.extra, "--steps", "1", "--profile", str(out / "trace")]
        bench(out, trace, deadline, env)
        if trace.result:
            trace.note = f"of {best.name}: {out / 'trace'} (TensorBoard / Perfetto)"
    steps.append(trace)
    return steps


def _shown(flags: list[str]) -> str:
    """The flags that say what a step ran (not how often it was timed, nor where it wrote)."""
    hidden = {"--steps", "--warmup", "--profile"}
    return " ".join(f for i, f in enumerate(flags) if f not in hidden and (
        i == 0 or flags[i - 1] not in hidden
    ))  # fmt: skip


def table(steps: list[Step]) -> str:
    lines = [
        "| step | flags | step ms | examples/s | MFU | peak memory GiB | compile s | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in steps:
        flags = _shown([*s.flags, *s.extra])
        r = s.result
        if r is None:
            lines.append(f"| {s.name} | {flags} | | | | | | {s.note} |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {s.name} | {flags} | {1e3 * r['step_time_s']:.1f} | {r['examples_per_s']:.1f} | "
            f"{mfu} | {r['peak_memory_bytes'] / 2**30:.2f} | {r['compile_s']:.1f} | {s.note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the folder for bench.json files and results.md")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset, any backend")
    parser.add_argument("--budget", type=float, help="seconds for the whole ladder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (SMOKE if args.smoke else FULL)["budget"]
    start = time.monotonic()
    steps = ladder(args.out, args.smoke, budget)
    import jax

    device = jax.devices()[0]
    ran = next((s.result for s in steps if s.result), {})
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = [
        f"# nnx-caption device ladder{' (smoke)' if args.smoke else ''}",
        "",
        f"{jax.device_count()} x {device.device_kind} ({device.platform}); jax {jax.__version__}, "
        f"Python {platform.python_version()}; {when}; "
        f"{time.monotonic() - start:.0f} s of a {budget:.0f} s budget.",
        f"MFU: model FLOPs per step (XLA's count of the unrolled step) / step time / "
        f"{ran.get('peak_source', 'the device peak')}.",
        "",
    ]
    text = "\n".join(header) + "\n" + table(steps) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
