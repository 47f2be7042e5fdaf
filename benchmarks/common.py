"""What the benchmarks share: the random full-size checkpoint, machine facts, peak FLOP/s,
and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

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


def matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """This machine's measured matmul FLOP/s in jax (n x n @ n x n, best of `repeats`): the
    peak that MFU and 'fraction of peak' are taken against on CPU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def update_results_md(title: str, section: str) -> None:
    """Replaces the "## {title}" section of RESULTS.md (up to the next "## "), keeping the rest."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)
