"""Data-parallel, FSDP and tensor-parallel train steps equal one device's (within 1e-5), with
the layers unrolled or scanned (with remat)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharded_train.py")


MESHES = ["8,1,1", "2,4,1", "2,2,2", "1,4,2", "2,2,2,scan"]


@pytest.fixture(scope="module")
def results() -> dict:
    """One process for every mesh: the single-device run is computed once."""
    out = subprocess.run([sys.executable, str(SCRIPT), *MESHES], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_train_steps_equal_single_device(results, mesh):
    result = results[mesh]
    assert result["loss_diff"] <= 1e-5, result["losses"]
    assert result["param_diff"] <= 1e-5
    # Optimizer-updated parameters keep the rules' sharding.
    assert result["specs"]["decoder.blocks.0.mlp.fc.kernel"] == "('fsdp', 'tensor')"
    assert result["specs"]["decoder.wte"] == "('tensor', 'fsdp')"


def test_a_sharded_checkpoint_restores_on_one_device_and_on_another_mesh(results):
    """Saved by orbax from an FSDP mesh (2,4,1) after its steps; restored exactly, step too."""
    restored = results["restored"]
    step = restored.pop("saved step")
    assert step > 0 and restored == {"one device": [0.0, step], "1,4,2": [0.0, step]}
