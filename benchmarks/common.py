"""What the benchmarks share: the random full-size checkpoint, machine facts, peak FLOP/s
(nnx_caption.bench's, as `nnx-caption bench` takes them), and RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from nnx_caption.bench import chip_peak as peak_flops  # noqa: F401 - the benchmarks' peak
from nnx_caption.bench import timed as bench_timed

HERE = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = HERE / ".cache" / "vit-gpt2-random"
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
GPT2_EOS = 50256


def make_checkpoint(directory: Path) -> None:
    """Random weights in the shape of nlpconnect/vit-gpt2-image-captioning, via transformers."""
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    dec = GPT2Config(add_cross_attention=True, is_decoder=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), dec)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = GPT2_EOS
    torch.manual_seed(0)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    VisionEncoderDecoderModel(config).save_pretrained(tmp)
    os.replace(tmp, directory)  # atomic: a killed run never leaves a half-written cache


def ensure_checkpoint(directory: Path = DEFAULT_CHECKPOINT) -> Path:
    """Writes the random checkpoint once (in a subprocess: torch never shares our process)."""
    if not directory.exists():
        print(f"writing a random checkpoint to {directory} (once) ...", flush=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        for stale in directory.parent.glob(directory.name + ".tmp*"):
            shutil.rmtree(stale)
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import common; "
            f"common.make_checkpoint(common.Path({str(directory)!r}))"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
    return directory


HF_FLAX_PYTHON = HERE / ".venv-hf-flax" / "bin" / "python"
HF_FLAX_SETUP = HERE / "peers" / "setup_hf_flax.sh"


def write_inputs(name: str, arrays: dict) -> Path:
    """The inputs every peer reads, in benchmarks/.cache/inputs_{name}.npz."""
    import numpy as np

    path = HERE / ".cache" / f"inputs_{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def run_worker(argv: list[str], python: Path | str = sys.executable) -> dict | None:
    """Runs one benchmark peer in a fresh process (its own peak memory, no thread pools
    shared with another peer) and returns the JSON it prints last; None when it fails."""
    proc = subprocess.run(
        [str(python), *map(str, argv)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"peer failed (exit {proc.returncode}): {' '.join(map(str, argv))}", flush=True)
        return None
    return json.loads(lines[-1])


def run_hf_flax(task: str, checkpoint: Path, inputs: Path, **options) -> dict | None:
    """HF's FlaxVisionEncoderDecoderModel (peers/hf_flax.py) in its own virtual environment,
    created by peers/setup_hf_flax.sh the first time (transformers 4.57 from PyPI)."""
    if not HF_FLAX_PYTHON.exists():
        print("setting up the HF Flax peer (benchmarks/peers/setup_hf_flax.sh) ...", flush=True)
        if subprocess.run(["bash", str(HF_FLAX_SETUP)]).returncode != 0:
            print("HF Flax peer unavailable: its setup failed; skipped", flush=True)
            return None
    argv = [HERE / "peers" / "hf_flax.py", "--task", task]
    argv += ["--checkpoint", checkpoint, "--inputs", inputs]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", value]
    return run_worker(argv, HF_FLAX_PYTHON)


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, median of `repeats` later calls, last result), by `nnx-caption
    bench`'s own timing (bench.timed, no warm-up beyond the first call). `fn` must wait for
    its own result (jax.block_until_ready), or the times measure dispatch only."""
    times, outputs = bench_timed(fn, repeats, warmup=0)
    return times["first_call_s"], times["step_time_s"], outputs[-1]


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {p: metadata.version(p) for p in ("jax", "flax", "transformers", "torch")}
    return dict(arch=platform.machine(), cpu=cpu, cores=str(os.cpu_count()), **versions)


def machine_line(m: dict[str, str]) -> str:
    return (
        f"Machine: {m['arch']}, {m['cpu']}, {m['cores']} cores; jax {m['jax']}, "
        f"flax {m['flax']}, transformers {m['transformers']}, torch {m['torch']}."
    )


def update_results_md(title: str, section: str) -> None:
    """Replaces the "## {title}" section of RESULTS.md (up to the next "## "), keeping the rest."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    section = section.rstrip("\n") + "\n\n"  # a blank line before the next section
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text.rstrip("\n") + "\n")
