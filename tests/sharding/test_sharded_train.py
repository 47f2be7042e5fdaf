"""Data-parallel, FSDP and tensor-parallel train steps equal one device's (within 1e-5), with
the layers unrolled or scanned (with remat)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharded_train.py")


@pytest.mark.parametrize(
    "mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (2, 2, 2, "scan")], ids=str
)
def test_sharded_train_steps_equal_single_device(mesh):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, mesh)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loss_diff"] <= 1e-5, result["losses"]
    assert result["param_diff"] <= 1e-5
    # Optimizer-updated parameters keep the rules' sharding.
    assert result["specs"]["decoder.blocks.0.mlp.fc.kernel"] == "('fsdp', 'tensor')"
    assert result["specs"]["decoder.wte"] == "('tensor', 'fsdp')"
