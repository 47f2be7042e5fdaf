"""The run directory: its lock (one live run; a dead holder's lock taken over, on this host by
its process being gone, from another host by its age) and what `train` may delete there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nnx_caption import rundir
from nnx_caption.errors import UsageError
from nnx_caption.rundir import DirectoryBusy, RunLock


def _lock_file(folder, **holder) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / rundir.LOCK_FILE
    path.write_text(json.dumps(holder))
    return str(path)


def _dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_live_holder_refuses_a_second_run_and_its_release_frees_the_folder(tmp_path):
    with RunLock(str(tmp_path)) as first:
        with pytest.raises(DirectoryBusy, match=f"process {os.getpid()}"):
            RunLock(str(tmp_path)).acquire()
        assert json.loads(open(first.path).read())["pid"] == os.getpid()
    assert not os.path.exists(first.path)
    with RunLock(str(tmp_path)):  # free again
        pass


def test_a_dead_holders_lock_is_taken_over_on_the_same_host(tmp_path):
    import socket

    _lock_file(tmp_path, host=socket.gethostname(), pid=_dead_pid(), started=None)
    with RunLock(str(tmp_path)) as lock:
        assert json.loads(open(lock.path).read())["pid"] == os.getpid()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """The lock's pid is alive, but it is another process than the one that wrote it (its
    start time differs): taken over."""
    import socket

    _lock_file(tmp_path, host=socket.gethostname(), pid=os.getppid(), started="1")
    with RunLock(str(tmp_path)) as lock:
        assert json.loads(open(lock.path).read())["pid"] == os.getpid()


def test_another_hosts_lock_is_taken_over_once_it_is_stale(tmp_path):
    path = _lock_file(tmp_path, host="elsewhere", pid=1, started=None)
    with pytest.raises(DirectoryBusy, match="elsewhere"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - rundir.STALE_SECONDS - 1
    os.utime(path, (old, old))
    with RunLock(str(tmp_path)) as lock:
        assert json.loads(open(lock.path).read())["host"] != "elsewhere"


def test_a_holder_notices_that_its_lock_was_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "REFRESH_SECONDS", 0.05)
    with RunLock(str(tmp_path)) as lock:
        before = os.stat(lock.path).st_mtime_ns
        time.sleep(0.3)
        assert os.stat(lock.path).st_mtime_ns > before and not lock.lost  # refreshed
        _lock_file(tmp_path, host="elsewhere", pid=1, started=None)
        time.sleep(0.3)
        assert lock.lost
    assert json.loads(open(lock.path).read())["host"] == "elsewhere"  # not removed: not ours


def test_a_folder_that_cannot_hold_a_lock_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        RunLock(str(tmp_path / "file")).acquire()


def _touch(root, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")


def test_plan_resumes_starts_over_or_refuses_by_what_the_folder_holds(tmp_path):
    out = tmp_path / "run"
    assert rundir.plan(str(out), overwrite=False, training=True) == "fresh"
    _touch(out, "train_args.json", "metrics.jsonl", "tensorboard/events.out.tfevents.1.h",
           "skipped_train.jsonl", "train.lock", "config.json.tmp999999999",
           "checkpoints/step_00000004.orbax-checkpoint-tmp/x")  # fmt: skip
    assert rundir.plan(str(out), overwrite=False, training=True) == "start over"
    _touch(out, "checkpoints/step_00000004/_CHECKPOINT_METADATA")
    assert rundir.plan(str(out), overwrite=False, training=True) == "resume"
    os.remove(out / "checkpoints/step_00000004/_CHECKPOINT_METADATA")
    _touch(out, "model.safetensors", "eval_results.json")  # a finished run, no checkpoint
    with pytest.raises(UsageError, match="model.safetensors") as err:
        rundir.plan(str(out), overwrite=False, training=True)
    assert "Nothing was deleted" in str(err.value)
    assert rundir.plan(str(out), overwrite=True, training=True) == "fresh"
    assert rundir.plan(str(out), overwrite=False, training=False) == "evaluate"
    mine = tmp_path / "mine"
    _touch(mine, "notes.txt")
    with pytest.raises(UsageError, match="notes.txt"):
        rundir.plan(str(mine), overwrite=False, training=True)


def test_clearing_an_earlier_run_removes_only_what_train_wrote(tmp_path):
    ours = ["metrics.jsonl", "tensorboard/events.out.tfevents.1.h",
            "checkpoints/step_00000004/x", "checkpoints/step_00000008.orbax-checkpoint-tmp/y",
            "model.safetensors.tmp999999999"]  # fmt: skip
    kept = ["train.csv", "images/0.png", "checkpoints/refused/step_00000012/x",
            "skipped_eval.jsonl", "dataset_images/train/0.png", "train_args.json",
            "model.safetensors", "tensorboard/notes.txt",
            f"config.json.tmp{os.getpid()}"]  # fmt: skip
    _touch(tmp_path, *ours, *kept)
    removed = rundir.clear_previous_run(str(tmp_path))
    assert sorted(removed) == sorted(
        [
            "metrics.jsonl",
            "tensorboard/events.out.tfevents.1.h",
            "checkpoints/step_00000004",
            "checkpoints/step_00000008.orbax-checkpoint-tmp",
            "model.safetensors.tmp999999999",
        ]  # fmt: skip
    )
    for name in kept:
        assert (tmp_path / name).exists(), name


def test_a_resumed_run_drops_the_metric_rows_it_will_log_again(tmp_path):
    rows = [{"step": 4, "loss": 1.0}, {"step": 8, "eval_loss": 2.0}, {"step": 12, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "lo'  # cut off by a kill
    )
    rundir.drop_rows_after(str(tmp_path), 8)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows[:2]
