"""`nnx-caption train` keeps what a run directory holds, as hostile and unlucky users meet it:
a second run on a live folder, a diverging resume of a finished run, a damaged checkpoint, a
finished run whose checkpoints are gone, data inside --overwrite_output_dir, a full disk, a
failing disk, a read-only folder, and a hub token that must not be written anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from shapes_runs import cli, launch, params, train_args, wait_for

KEEP_TWO = ("--save_total_limit", "2")


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """A finished run (24 steps, a checkpoint every 4, the newest 2 kept) and its export."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = cli(*train_args(setup, out), *KEEP_TWO)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _digests(folder: Path, skip=("metrics.jsonl", "train_args.json", "tensorboard")) -> dict:
    """{path: sha256} of every file under `folder`, but for the logs a run appends to."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in skip
    }


def _error_line(stderr: str) -> str:
    """The one error line a refused or failed command ends with; nothing like a traceback."""
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]
    line = stderr.rstrip().splitlines()[-1]
    assert line.startswith("nnx-caption train: error: "), stderr[-3000:]
    return line


def test_a_second_run_on_a_live_folder_is_refused_at_once_and_the_first_is_intact(setup, tmp_path):
    out = tmp_path / "live"
    first = launch(setup, out, extra=("--max_steps", "240"))
    wait_for(first, out / "metrics.jsonl")  # it is training
    start = time.monotonic()
    second = cli(*train_args(setup, out), "--max_steps", "240")
    assert second.returncode == 2 and time.monotonic() - start < 60
    line = _error_line(second.stderr)
    assert "in use by another run" in line and f"process {first.pid}" in line
    assert first.wait(timeout=600) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(4, 241, 4))  # each logged once, in order
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert not (out / "train.lock").exists()


def test_a_stale_lock_of_another_host_is_taken_over(setup, tmp_path):
    """Process 0 came back on another host after the first was SIGKILLed: the lock it left is
    taken over once it has not been refreshed for its stated time."""
    out = tmp_path / "moved"
    out.mkdir()
    lock = out / "train.lock"
    lock.write_text(json.dumps({"host": "a-host-that-died", "pid": 4242, "started": "7"}))
    busy = cli(*train_args(setup, out))
    assert busy.returncode == 2 and "a-host-that-died" in _error_line(busy.stderr)
    old = time.time() - 3600
    os.utime(lock, (old, old))
    done = cli(*train_args(setup, out), "--max_steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over the lock" in done.stderr and not lock.exists()


def test_a_diverging_resume_keeps_the_finished_run_and_a_lower_rate_resumes(
    setup, finished, tmp_path
):
    """A finished good run resumed with a learning rate that makes the loss NaN: it stops with
    exit 1 naming the step and the last good checkpoint; its export and its checkpoints
    (which --save_total_limit 2 would have rotated out) are byte for byte as they were. The
    same command with a lower rate resumes from that checkpoint."""
    out = _copy(finished, tmp_path / "run")
    before = _digests(out)
    diverged = cli(
        *train_args(setup, out), "--max_steps", "48", *KEEP_TWO, "--learning_rate", "1e4"
    )
    assert diverged.returncode == 1
    line = _error_line(diverged.stderr)
    assert re.search(r"training diverged: .* NaN or Inf at step (25|26|27|28)\b", line), line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000024'}" in line
    assert _digests(out) == before
    lowered = cli(*train_args(setup, out), "--max_steps", "28", *KEEP_TWO)
    assert lowered.returncode == 0, lowered.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000024'}" in lowered.stderr


def _flip(checkpoint: Path) -> None:
    """64 bytes changed at a quarter, half and three quarters of each data file of the
    checkpoint: what a bad disk does. Everywhere, not at one spot: which file holds which
    array varies from run to run, and a file may hold bytes no restore reads (a chunk that was
    written again), where a change is harmless and no check could see it."""
    files = [p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"]
    for data in (p for p in files if p.parent.parent.name.startswith("ocdbt.process_")):
        raw = bytearray(data.read_bytes())
        if len(raw) < 4096:  # a b-tree node, not array data
            continue
        for at in (len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4):
            raw[at : at + 64] = bytes(b ^ 0x01 for b in raw[at : at + 64])
        data.write_bytes(bytes(raw))


def test_a_damaged_newest_checkpoint_is_refused_and_the_run_ends_as_if_unharmed(
    setup, finished, tmp_path
):
    out = _copy(finished, tmp_path / "run")
    _flip(out / "checkpoints" / "step_00000024")
    (out / "config.json").unlink()  # as if the export had not been written yet
    again = cli(*train_args(setup, out), *KEEP_TWO)
    assert again.returncode == 0, again.stderr[-3000:]
    # Which of orbax's files hold array data and which its index varies from run to run:
    # damage shows as arrays that differ from their checksums, or as orbax refusing a file.
    refusal = r"refused (\d+ of \d+ arrays differ from the checksums|cannot restore it)"
    assert re.search(refusal, again.stderr) and "step_00000024" in again.stderr, again.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000020'}" in again.stderr
    assert (out / "checkpoints" / "refused" / "step_00000024").is_dir()  # kept for a look
    want, got = params(finished), params(out)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_finished_run_without_usable_checkpoints_is_refused_and_nothing_deleted(
    setup, finished, tmp_path
):
    out = _copy(finished, tmp_path / "run")
    for checkpoint in (out / "checkpoints").iterdir():
        _flip(checkpoint)
    refused = cli(*train_args(setup, out), *KEEP_TWO)
    assert refused.returncode == 2
    assert "no checkpoint" in _error_line(refused.stderr)
    before = _digests(out)
    again = cli(*train_args(setup, out), *KEEP_TWO)  # now it holds no checkpoint at all
    assert again.returncode == 2
    line = _error_line(again.stderr)
    assert "holds an earlier run" in line and "Nothing was deleted" in line
    assert _digests(out) == before
    shutil.rmtree(out / "checkpoints")  # gone altogether
    assert cli(*train_args(setup, out), *KEEP_TWO).returncode == 2
    assert {k: v for k, v in _digests(out).items() if not k.startswith("checkpoints")} == {
        k: v for k, v in before.items() if not k.startswith("checkpoints")
    }


def test_overwrite_output_dir_trains_there_and_keeps_the_data_and_the_model_it_reads(
    setup, tmp_path
):
    """HF's meaning: write into a folder that is not empty. Training data inside it stays;
    evaluating a model with --output_dir its own folder keeps the model."""
    out = tmp_path / "with_data"
    shutil.copytree(setup["splits"]["train"], out / "train")
    stale = out / "model.safetensors.tmp999999999"  # an export cut off by a kill
    stale.write_text("partial")
    data = _digests(out / "train")
    args = train_args(setup, out)
    args[args.index("--train_file") + 1] = str(out / "train")
    done = cli(*args, "--max_steps", "4", "--overwrite_output_dir")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(out / "train") == data and not stale.exists()
    model = (out / "model.safetensors").read_bytes()
    evaluated = cli(
        "train",
        *("--model_name_or_path", str(out), "--output_dir", str(out), "--do_eval"),
        *("--validation_file", str(out / "train"), "--image_column", "file_name"),
        *("--caption_column", "text", "--max_target_length", "16", "--max_eval_samples", "8"),
        "--overwrite_output_dir",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (out / "model.safetensors").read_bytes() == model
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] > 0
    assert _digests(out / "train") == data


def test_the_hub_token_is_in_no_file_and_a_failed_push_is_one_error(setup, tmp_path):
    """--hub_token appears in no byte the run writes; with the hub out of reach the push is one
    error (exit 1) after everything else is saved; published files name images relative to
    the data."""
    token = "hf_ThisTokenMustNotBeWrittenAnywhere"
    out = tmp_path / "pushed"
    proc = cli(
        *train_args(setup, out),
        *("--max_steps", "4", "--do_eval", "--predict_with_generate"),
        *("--validation_file", setup["splits"]["validation"], "--max_eval_samples", "8"),
        *("--push_to_hub", "--hub_model_id", "someone/captioner", "--hub_token", token),
        env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens there
    )
    assert proc.returncode == 1
    line = _error_line(proc.stderr)
    assert "--push_to_hub someone/captioner" in line and "Everything else is saved" in line
    assert token not in proc.stderr + proc.stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert json.loads((out / "train_args.json").read_text())["hub_token"] == "<HUB_TOKEN>"
    assert (out / "model.safetensors").exists() and (out / "eval_results.json").exists()
    generated = json.loads((out / "generated_eval.json").read_text())
    images = Path(setup["splits"]["validation"])
    assert len(generated) == 8
    for g in generated:  # named as the data folder names them
        assert not os.path.isabs(g["image"]) and (images / g["image"]).is_file(), g["image"]
    assert str(images) not in (out / "gallery_eval.html").read_text()


FILE_SIZE_LIMIT = """
import resource, signal, subprocess, sys
def limit():  # writes past it fail with EFBIG ("File too large"), as a failing disk's do
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
sys.exit(subprocess.run(sys.argv[1:], preexec_fn=limit).returncode)
"""


def test_a_checkpoint_write_that_fails_stops_the_run_with_one_error(setup, tmp_path):
    """The checkpoint's data files fail to write in orbax's background thread (a write limit
    below their size): one error naming the checkpoint, the cause and the last complete one,
    exit 1, by the next save at the latest; none of orbax's or tensorstore's tracebacks."""
    script = tmp_path / "limit.py"
    script.write_text(FILE_SIZE_LIMIT)
    out = tmp_path / "failing"
    proc = subprocess.run(
        [sys.executable, str(script), sys.executable, "-m", "nnx_caption.cli",
         *train_args(setup, out), "--preprocessing_num_workers", "0"],  # no shared memory
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    line = _error_line(proc.stderr)
    want = f"saving {out / 'checkpoints' / 'step_00000004'} failed: File too large"
    assert want in line and "The last complete checkpoint is none" in line
    assert "Exception" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert max(steps) <= 8  # it stopped by the next save


def _in_mount_namespace(script: str, tmp_path: Path) -> None:
    """Runs a shell script in a mount namespace of its own (its mounts vanish with it)."""
    path = tmp_path / "namespace.sh"
    path.write_text(script)
    for unshare in (["unshare", "-m"], ["unshare", "-r", "-m"]):  # as root; as a user
        probe = subprocess.run([*unshare, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip(f"no mount namespace can be made here: {probe.stderr.strip()}")
    done = subprocess.run([*unshare, "--propagation", "private", "sh", "-e", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_a_full_disk_stops_at_the_save_it_has_no_room_for_and_the_run_resumes(
    setup, finished, tmp_path
):
    """The run directory on a small tmpfs: room for the first checkpoint, not the second.
    One error (exit 1) before anything is written; once there is room, the same command
    resumes from the first checkpoint and ends with the weights of an unbroken run."""
    import jax

    import nnx_caption as nc
    from nnx_caption.checkpointing import SAVE_MARGIN_BYTES
    from nnx_caption.train import TrainConfig, Trainer

    state = Trainer(nc.from_pretrained(setup["init"]), TrainConfig()).state
    needed = sum(x.nbytes for x in jax.tree.leaves(state)) + SAVE_MARGIN_BYTES
    on_disk = (
        sum(p.stat().st_blocks * 512 for p in (finished / "checkpoints").rglob("*") if p.is_file())
        // 2
    )  # the two checkpoints kept there
    size_k = (needed + 64 * 1024 + on_disk // 2) // 1024  # first save fits, the second not
    out, copy, logs = tmp_path / "mounted", tmp_path / "copy", tmp_path / "logs"
    for folder in (out, copy, logs):
        folder.mkdir()
    command = " ".join([sys.executable, "-m", "nnx_caption.cli", *train_args(setup, out)])
    _in_mount_namespace(
        f"""
mount -t tmpfs -o size={size_k}k tmpfs {out}
{command} > {logs}/full.log 2>&1 || echo $? > {logs}/full.rc
mount -o remount,size=64m {out}
{command} > {logs}/roomy.log 2>&1 || echo $? > {logs}/roomy.rc
cp -a {out}/. {copy}/
""",
        tmp_path,
    )
    full = (logs / "full.log").read_text()
    assert (logs / "full.rc").read_text().strip() == "1"
    line = _error_line(full)
    assert f"no room to save {out / 'checkpoints' / 'step_00000008'}" in line
    assert f"The last complete checkpoint is {out / 'checkpoints' / 'step_00000004'}" in line
    roomy = (logs / "roomy.log").read_text()
    assert not (logs / "roomy.rc").exists(), roomy[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'}" in roomy
    want, got = params(finished), params(copy)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_read_only_output_dir_is_a_usage_error_before_anything_runs(setup, tmp_path):
    out, logs = tmp_path / "read_only", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    command = " ".join([sys.executable, "-m", "nnx_caption.cli", *train_args(setup, out)])
    _in_mount_namespace(
        f"""
mount -t tmpfs -o ro,size=1m tmpfs {out}
{command} > {logs}/ro.log 2>&1 || echo $? > {logs}/ro.rc
""",
        tmp_path,
    )
    assert (logs / "ro.rc").read_text().strip() == "2"
    line = _error_line((logs / "ro.log").read_text())
    assert f"--output_dir {out} cannot be written (Read-only file system)" in line
