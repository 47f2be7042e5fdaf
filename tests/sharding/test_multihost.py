"""Two processes with jax.distributed (gloo, 2 CPU devices each): the same losses, parameters,
checkpoint, evaluation loss and generated captions as one process on one device."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import numpy as np
from flax import nnx

import nnx_caption as nc
from nnx_caption.config import tiny

SCRIPT = pathlib.Path(__file__).with_name("multihost_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    nc.save_pretrained(nc.VisionEncoderDecoder(tiny(), rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    ckpt = str(tmp_path / "ckpt")
    single = subprocess.run(
        [sys.executable, str(SCRIPT), ckpt, str(tmp_path / "one.npz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), ckpt, str(tmp_path / "two.npz"), port, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_allclose(two["losses"], one["losses"], atol=1e-5)
    np.testing.assert_array_equal(two["sequences"], one["sequences"])  # generate over hosts
    for name in one.files:
        if name != "sequences":
            np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
