"""`nnx-caption predict` and `bench` as two jax.distributed processes of 2 CPU devices each, and
what the distributed flags refuse: the same results as one process, written once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from shapes_runs import Processes, free_port


def _ran(processes: Processes) -> list[tuple[str, str]]:
    done = processes.finish()
    for status, _, err in done:
        assert status == 0, err[-3000:]
    return [(out, err) for _, out, err in done]


def test_predict_as_two_processes_writes_what_one_does(tiny_dir, tmp_path):
    """Each process decodes its rows of each batch; process 0 writes predictions.jsonl in
    input order, skipped.jsonl and the gallery."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):  # 9 good images and a broken one: batches of 4, the last one short
        shutil.copy(tiny_dir / "sample.png", images / f"{i}.png")
    from PIL import Image

    for i in range(9):  # each its own content: the captions differ
        Image.open(images / f"{i}.png").rotate(40 * i).save(images / f"{i}.png")
    (images / "5b.png").write_bytes(b"")
    runs = {}
    for processes, devices in ((1, 4), (2, 2)):
        out = tmp_path / f"out{processes}"
        args = ["predict", str(tiny_dir), str(images), "--output_dir", str(out),
                "--batch_size", "4", "--num_beams", "2"]  # fmt: skip
        outputs = _ran(Processes(args, tmp_path / f"logs{processes}", processes, devices))
        runs[processes] = out
    assert "captioned 9 images, skipped 1" in outputs[0][0]
    assert "captioned" not in outputs[1][0]  # process 0 says it (gloo prints its own lines)
    one, two = ([json.loads(line) for line in open(runs[n] / "predictions.jsonl")] for n in (1, 2))
    assert (
        [r["image"] for r in two]
        == [r["image"] for r in one]
        == sorted(str(p) for p in images.glob("*.png") if p.name != "5b.png")
    )
    assert [r["caption"] for r in two] == [r["caption"] for r in one]
    assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], rel=1e-5)
    assert (runs[2] / "skipped.jsonl").read_text() == (runs[1] / "skipped.jsonl").read_text()
    assert sorted(p.name for p in runs[2].iterdir()) == sorted(p.name for p in runs[1].iterdir())
    page = (runs[2] / "gallery.html").read_text()
    assert all(r["caption"] in page for r in two) and page.count("<figure") == 9


def test_bench_as_two_processes(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--preset", "tiny", "--what", "both", "--steps", "2", "--warmup", "0",
            "--per_device_batch_size", "2", "--output_dir", str(out)]  # fmt: skip
    outputs = _ran(Processes(args, tmp_path / "logs"))
    assert "bench.json" in outputs[0][0] and "bench.json" not in outputs[1][0]
    results = json.loads((out / "bench.json").read_text())
    assert [r["what"] for r in results] == ["decode", "train"]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 4 and r["global_batch"] == 8
        assert r["examples_per_s_per_device"] == pytest.approx(r["examples_per_s"] / 4)
        assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}


def test_an_unreachable_coordinator_is_named_within_the_timeout(tmp_path):
    """Process 1 of 2, and no process 0 anywhere: it says where it looked, and when."""
    address = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "nnx_caption.cli", "bench", "--preset", "tiny",
         "--coordinator_address", address, "--num_processes", "2", "--process_id", "1",
         "--initialization_timeout", "3", "--output_dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and time.monotonic() - start < 60
    line = done.stderr.rstrip().splitlines()[-1]
    assert f"nothing answers at {address} after --initialization_timeout 3 s" in line
    assert "Traceback" not in done.stderr
