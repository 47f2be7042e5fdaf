"""Shared fixtures. torch and transformers are imported lazily: the fast tier never needs them."""

from __future__ import annotations

import os
import pathlib

import pytest
from reference import build_hf_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny"


@pytest.fixture(scope="session")
def tiny_dir() -> pathlib.Path:
    return TINY


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: saves a random HF checkpoint to a temp dir, returns (torch model, dir)."""

    def make(encoder: dict, decoder: dict, name: str = "ckpt", save_kwargs=None, **kw):
        model = build_hf_model(encoder, decoder, **kw)
        path = tmp_path / name
        model.save_pretrained(path, **(save_kwargs or {}))
        return model, path

    return make


def pytest_configure(config):
    # Every test process sees the same, quiet JAX on CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The suite's time is XLA's compile time (tiny models, a few steps each), and LLVM's -O0
    # compiles ~3x faster than the default -O2: a tiny model's gradient step takes 5 s instead
    # of 16 s to compile, and runs in 12 ms instead of 6. Only the generated machine code's
    # speed changes; every test still runs what users run. Subprocesses inherit it.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
