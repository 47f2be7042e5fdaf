"""`benchmarks/device.sh OUT --smoke`: the prepared accelerator run's ladder on the tiny preset,
here on the CPU: every step's bench.json and the results table, the cudnn step skipped with a
note, one profiler trace."""

from __future__ import annotations

import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).parents[2]
STEPS = ["train_b2", "train_b4", "train_b8", "train_b2_scan", "train_b4_scan", "train_b8_scan"]
STEPS += ["train_best_cudnn", "decode_greedy", "decode_beam4", "trace"]


def test_the_smoke_ladder_writes_every_bench_json_and_its_table(tmp_path):
    out = tmp_path / "ladder"
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "device.sh"), str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "results.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}  # after the header
    assert list(rows) == STEPS, table
    assert "skipped: cuDNN needs an NVIDIA GPU (jax runs on cpu)" in rows["train_best_cudnn"]
    ran = [s for s in STEPS if "skipped" not in rows[s] and "stopped" not in rows[s]]
    assert ran[:1] == ["train_b2"], table  # the first step always runs
    for step in ran:
        assert "failed" not in rows[step], table
        (result,) = [r for r in json.loads((out / step / "bench.json").read_text())]
        assert result["backend"] == "cpu" and result["step_time_s"] > 0
        assert f"{1e3 * result['step_time_s']:.1f}" in rows[step]
    if "trace" in ran:
        assert any((out / "trace").rglob("*.xplane.pb"))
