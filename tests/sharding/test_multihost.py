"""Two processes with jax.distributed (gloo, 2 CPU devices each) against one process on one
device: each process decodes its block of the images and the rest its rows need; the same
losses, evaluation loss and generated captions; a checkpoint both wrote, each its own
shards, restored on one process with 1 device and with 4 (another mesh), and the resumed run
ends where the uninterrupted one does."""

from __future__ import annotations

import csv
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from shapes_runs import free_port

SCRIPT = pathlib.Path(__file__).with_name("multihost_train.py")
IMAGES = 24  # 3 global batches of 8: one epoch in the 3 steps of the two-process run


def _run(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )
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


class _TwoProcesses:
    """multihost_train.py in `mode` as the two processes of a jax.distributed run. Their
    output goes to files: a pipe that no one reads while its process waits in a collective
    for the other could fill and stall both."""

    def __init__(self, mode: str, table: pathlib.Path, out: pathlib.Path) -> None:
        port = str(free_port())
        self.logs = [(out.parent / f"{i}.out", out.parent / f"{i}.err") for i in range(2)]
        self.procs = []
        for i, (stdout, stderr) in enumerate(self.logs):
            with open(stdout, "w") as o, open(stderr, "w") as e:
                command = [sys.executable, str(SCRIPT), mode, str(table), str(out), port, str(i)]
                self.procs.append(subprocess.Popen(command, stdout=o, stderr=e))

    def wait_for_line(self, word: str, seconds: float = 300) -> None:
        """Until each process has printed a line ending in `word` (gloo and XLA write to
        stdout too, maybe on the same line)."""
        deadline = time.monotonic() + seconds
        try:
            for i, p in enumerate(self.procs):
                while not any(s.rstrip().endswith(word) for s in self.stdout(i).splitlines()):
                    assert p.poll() is None, f"process {i} ended first: {self.stderr(i)[-3000:]}"
                    assert time.monotonic() < deadline, f"process {i} printed no {word!r}"
                    time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    def finish(self, seconds: float = 600) -> None:
        """Both processes exit 0 within `seconds`; none is left running."""
        deadline = time.monotonic() + seconds
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            self.kill()
        for i, p in enumerate(self.procs):
            assert p.returncode == 0, self.stderr(i)[-3000:]

    def kill(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def stdout(self, i: int) -> str:
        return self.logs[i][0].read_text()

    def stderr(self, i: int) -> str:
        return self.logs[i][1].read_text()


def test_two_processes_equal_one_and_restore_on_other_meshes(tmp_path):
    table = _table(tmp_path, IMAGES, seed=0)
    for name in ("one", "two", "1", "4"):
        (tmp_path / name).mkdir()
    _run("one", str(table), str(tmp_path / "one" / "out.npz"))
    two_out = tmp_path / "two" / "out.npz"
    _TwoProcesses("two", table, two_out).finish()
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
    run = _TwoProcesses("preempt", table, tmp_path / "run" / "out.npz")
    run.wait_for_line("ready")  # compiled and stepping
    run.procs[1].send_signal(signal.SIGTERM)
    run.finish(seconds=300)
    outs = [run.stdout(i) for i in range(2)]
    stops = {line.split()[-1] for out in outs for line in out.splitlines() if "stopped" in line}
    assert len(stops) == 1, stops  # one step for both
    (step,) = stops
    saved = tmp_path / "run" / "checkpoints" / f"step_{int(step):08d}"
    shards = sorted(p.name for p in saved.rglob("*") if "ocdbt.process_" in p.name)
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"], shards
