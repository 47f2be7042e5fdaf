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
