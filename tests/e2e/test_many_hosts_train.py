"""`nnx-caption train` as two jax.distributed processes of 2 CPU devices each, against one
process of 4 devices with the same flags (mesh and global batch equal), on data with bad rows:
the same run, written once; FSDP across the processes; a lost process; a SLURM step."""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from shapes_runs import Processes, free_port

STEPS = "24"


@pytest.fixture(scope="module")
def data(setup, tmp_path_factory) -> dict[str, Path]:
    """64 training rows with bad ones (two images whose data is cut: found only by decoding;
    a missing file; an empty caption) and 16 validation rows, as csv files."""
    root = tmp_path_factory.mktemp("bad_rows")
    split = Path(setup["splits"]["train"])
    rows = [json.loads(line) for line in open(split / "metadata.jsonl")][:64]
    (root / "images").mkdir()
    table = []
    for i, row in enumerate(rows):
        image = (split / row["file_name"]).read_bytes()
        cut = i in (3, 17)
        (root / "images" / row["file_name"]).write_bytes(image[: len(image) // 2] if cut else image)
        table.append([f"images/{row['file_name']}", "" if i == 30 else row["text"]])
    table.append(["images/missing.png", "an image that is not there"])
    validation = Path(setup["splits"]["validation"])
    held = [json.loads(line) for line in open(validation / "metadata.jsonl")][:16]
    for name, records in (
        ("train.csv", table),
        ("validation.csv", [[str(validation / r["file_name"]), r["text"]] for r in held]),
    ):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows([["image_path", "caption"], *records])
    return {"train": root / "train.csv", "validation": root / "validation.csv"}


def _args(setup, data, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        *("--model_name_or_path", str(setup["init"]), "--output_dir", str(out)),
        *("--train_file", str(data["train"]), "--validation_file", str(data["validation"])),
        *("--do_train", "--do_eval", "--predict_with_generate", "--max_steps", STEPS),
        *("--save_steps", "4", "--logging_steps", "2", "--learning_rate", "1e-3", "--seed", "3"),
        *("--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4"),
        *("--max_target_length", "16", "--preprocessing_num_workers", "0"),
        *extra,
    ]


def _ran(processes: Processes) -> list[str]:
    """Each process's stderr, once all have exited 0."""
    done = processes.finish()
    for status, _, err in done:
        assert status == 0, err[-3000:]
    return [err for _, _, err in done]


@pytest.fixture(scope="module")
def one(setup, data, tmp_path_factory) -> Path:
    """The run as one process of 4 devices."""
    out = tmp_path_factory.mktemp("one") / "run"
    _ran(Processes(_args(setup, data, out), out.parent / "logs", processes=1, devices=4))
    return out


def _files(run: Path) -> list[str]:
    """The run directory's files, checkpoint shards and TensorBoard's file name left out."""
    return sorted(
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.is_file() and p.relative_to(run).parts[0] not in ("checkpoints", "tensorboard")
    )


def _weights(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "model.safetensors")


def test_two_processes_train_evaluate_and_export_as_one_does(setup, data, one, tmp_path):
    out = tmp_path / "run"
    errs = _ran(Processes(_args(setup, data, out), tmp_path / "logs"))
    assert "2 processes: 2 local and 4 global devices" in errs[0]
    assert "[nnx-caption] train: " not in errs[1]  # process 0 tells what it does
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    want = [json.loads(line) for line in open(one / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in want]  # each row written once
    for got, expected in zip(rows, want, strict=True):
        for key in ("loss", "grad_norm", "eval_loss", "eval_CIDEr"):
            if key in expected:
                assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    results = json.loads((out / "eval_results.json").read_text())
    assert results == pytest.approx(json.loads((one / "eval_results.json").read_text()), rel=1e-5)
    generated = json.loads((out / "generated_eval.json").read_text())
    assert generated == json.loads((one / "generated_eval.json").read_text())
    assert len({g["image"] for g in generated}) == len(generated) == 16  # every image once
    skipped = [json.loads(line) for line in open(out / "skipped_train.jsonl")]
    assert len(skipped) == 4  # the two cut images too, found before training as one finds them
    assert _files(out) == _files(one)  # the same files, written once
    assert len(list((out / "tensorboard").iterdir())) == 1
    shards = {p.name for p in (out / "checkpoints").rglob("ocdbt.process_*")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}  # each process its own
    want, got = _weights(one), _weights(out)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_fsdp_over_two_processes_exports_the_whole_model(setup, data, one, tmp_path):
    """--mesh_fsdp 4 across the processes: no process holds a whole tensor; the export gathers
    each in turn and is complete, transformers loads it, and it is the data-parallel run's."""
    out = tmp_path / "run"
    _ran(Processes(_args(setup, data, out, "--mesh_fsdp", "4"), tmp_path / "logs"))
    want, got = _weights(one), _weights(out)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)
    from transformers import VisionEncoderDecoderModel

    VisionEncoderDecoderModel.from_pretrained(out)  # strict enough: it raises on a bad file


def test_a_lost_process_stops_the_other_and_the_same_commands_resume(setup, data, one, tmp_path):
    """SIGKILL to process 1 once a checkpoint is written: process 0 exits non-zero within the
    heartbeat timeout (jax ends it, or its next collective fails first); the same two commands
    then resume and end with the uninterrupted run's weights."""
    out, heartbeat = tmp_path / "run", 10
    args = _args(setup, data, out, "--heartbeat_timeout", str(heartbeat))
    run = Processes(args, tmp_path / "killed")
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_00000008" / "_CHECKPOINT_METADATA").exists():
        assert all(p.poll() is None for p in run.procs) and time.monotonic() < deadline
        time.sleep(0.01)
    run.procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    run.procs[0].wait(timeout=heartbeat + 60)
    assert run.procs[0].returncode != 0
    print(f"process 0 ended {time.monotonic() - killed:.1f} s after process 1 was killed")
    assert not (out / "model.safetensors").exists()
    errs = _ran(Processes(args, tmp_path / "resumed"))
    assert "resumed from" in errs[0], run.output(0)[1][-3000:] + "\n===\n" + errs[0][-3000:]
    want, got = _weights(one), _weights(out)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_a_slurm_step_runs_without_the_three_flags(setup, data, tmp_path):
    """jax's SLURM detection, faked on localhost: a two-task step runs as two processes."""
    out = tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "JAX_COORDINATOR_PORT": str(free_port())}  # fmt: skip
    args = _args(setup, data, out, "--max_steps", "4")
    runs = []
    for task in range(2):  # Processes passes no distributed flags for one process each
        env = {**slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}
        runs.append(Processes(args, tmp_path / f"task{task}", processes=1, devices=2, env=env))
    errs = [_ran(r)[0] for r in runs]
    assert "2 processes: 2 local and 4 global devices" in errs[0]
    shards = {p.name for p in (out / "checkpoints").rglob("ocdbt.process_*")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][-2:] == [4, 4]
