"""Two processes with jax.distributed (gloo, 2 CPU devices each) against one process on one
device: each process decodes its block of the images and the rest its rows need; the same
losses, evaluation loss and generated captions; a checkpoint both wrote, each its own
shards, restored on one process with 1 device and with 4 (another mesh), and the resumed run
ends where the uninterrupted one does."""

from __future__ import annotations

import csv
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

SCRIPT = pathlib.Path(__file__).with_name("multihost_train.py")
IMAGES = 24  # 3 global batches of 8: one epoch in the 3 steps of the two-process run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _table(tmp_path: pathlib.Path, images: int, seed: int) -> pathlib.Path:
    """A caption table of `images` random PNGs."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(images):
        path = tmp_path / "images" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(path)
        rows.append([f"images/{i}.png", f"a picture number {i % 5}"])
    table = tmp_path / "train.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    return table


def _two_processes(mode: str, table: pathlib.Path, out: str) -> list[subprocess.Popen]:
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), mode, str(table), out, port, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def test_two_processes_equal_one_and_restore_on_other_meshes(tmp_path):
    table = _table(tmp_path, IMAGES, seed=0)
    for name in ("one", "two", "1", "4"):
        (tmp_path / name).mkdir()
    _run("one", str(table), str(tmp_path / "one" / "out.npz"))
    two_out = str(tmp_path / "two" / "out.npz")
    procs = _two_processes("two", table, two_out)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    one, two = np.load(tmp_path / "one" / "out.npz"), np.load(two_out)
    # Each process decoded its block of 12 up front (so that both skip the rows one process
    # would), then those of its rows that the other's block held; never all 24, which one
    # process decodes.
    assert all(IMAGES // 2 <= d < IMAGES for d in two["decoded"]), two["decoded"]
    assert list(one["decoded"]) == [IMAGES]
    np.testing.assert_allclose(two["losses"], one["losses"][:3], atol=1e-5)
    np.testing.assert_allclose(two["eval_3"], one["eval_3"], rtol=1e-5)
    np.testing.assert_array_equal(two["sequences_3"], one["sequences_3"])  # generate over hosts
    shards = sorted(p.name for p in (tmp_path / "two").rglob("*") if "ocdbt.process_" in p.name)
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"], shards  # each process's own

    for devices in ("1", "4"):
        (tmp_path / devices / "checkpoints").symlink_to(tmp_path / "two" / "checkpoints")
        _run("restore", str(table), str(tmp_path / devices / "out.npz"), devices)
        resumed = np.load(tmp_path / devices / "out.npz")
        params = [n for n in two.files if n.startswith(("encoder", "decoder"))]
        assert params
        for name in params:  # as the two processes saved them, on another mesh
            np.testing.assert_array_equal(resumed[f"restored.{name}"], two[name], err_msg=name)
            np.testing.assert_allclose(resumed[name], one[name], atol=1e-2, err_msg=name)
        np.testing.assert_allclose(resumed["losses"], one["losses"][3:], rtol=1e-4)
        assert abs(resumed["eval_4"] - one["eval_4"]) <= 0.02 * one["eval_4"]


def test_sigterm_on_one_process_stops_both_at_one_step_with_a_checkpoint(tmp_path):
    """SIGTERM to one of two processes: they agree on one step, both stop after it and save
    it (each its own shards), and both exit 0: neither waits for the other in a collective."""
    table = _table(tmp_path, 16, seed=1)
    (tmp_path / "run").mkdir()
    procs = _two_processes("preempt", table, str(tmp_path / "run" / "out.npz"))
    try:
        for p in procs:  # gloo and XLA write to stdout too, maybe on the same line
            while (line := p.stdout.readline()) and not line.rstrip().endswith("ready"):
                pass
            assert line, "a process ended before stepping"
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stops = {line.split()[-1] for out, _ in outs for line in out.splitlines() if "stopped" in line}
    assert len(stops) == 1, stops  # one step for both
    (step,) = stops
    saved = tmp_path / "run" / "checkpoints" / f"step_{int(step):08d}"
    shards = sorted(p.name for p in saved.rglob("*") if "ocdbt.process_" in p.name)
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"], shards
