"""A run directory (`train --output_dir`): one run at a time holds it (`RunLock`), and a command
deletes there only what a run of `train` wrote itself.

- The lock is a file naming its holder (host, process id and the process's start time), its
  modification time refreshed while the run lives. A second run is refused at once; a dead
  holder's lock is taken over: on the same host when its process is gone, from another host
  when it has not been refreshed for STALE_SECONDS. So a SIGKILLed run resumes with the same
  command, also when it comes back on another host.
- What a folder holds decides what `train` does there (`plan`): resume from its newest
  checkpoint; start over where it holds nothing but what a run wrote before its first
  checkpoint; start from scratch anywhere with --overwrite_output_dir (HF's meaning: write
  into a non-empty folder, never delete it); otherwise refuse, naming what is there.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import socket
import threading
import time

from nnx_caption.checkpointing import REFUSED, STEP_PREFIX, checkpoints
from nnx_caption.errors import UsageError
from nnx_caption.files import replacing
from nnx_caption.hub import AUX_FILES, HF_WEIGHTS, NNX_WEIGHTS
from nnx_caption.names import listing
from nnx_caption.plots import METRICS_FILE, PLOT_FILES

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"
REFRESH_SECONDS = 10.0  # how often a live run touches its lock
STALE_SECONDS = 60.0  # another host's lock untouched this long belongs to a dead run


class DirectoryBusy(UsageError):
    """Another live run holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid
    from the process that wrote a lock; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """`with RunLock(output_dir):` holds output_dir's lock for the block (see the module)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        pid = os.getpid()
        self.record = {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}
        self._stop = threading.Event()
        self.lost = False  # another run took the lock over (it found this one stale)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock: DirectoryBusy when a live run holds it, UsageError when the folder
        cannot be written."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except FileExistsError:
            raise UsageError(f"--output_dir {self.directory} is a file: name a folder") from None
        except OSError as err:
            raise UsageError(
                f"--output_dir {self.directory} cannot be created: {err.strerror}"
            ) from None
        for _ in range(3):  # each pass either takes the lock or takes over a dead holder's
            if self._create():
                break
            holder = self._read(self.path)  # None: gone, or being written by its creator
            if self._holder_alive(holder) if holder else self._age() < STALE_SECONDS:
                raise DirectoryBusy(self._busy(holder or {}))
            self._take_over(holder)
        else:
            raise DirectoryBusy(f"{self.path}: other runs keep taking this lock; try again")
        threading.Thread(target=self._refresh, name="nnx-caption-lock", daemon=True).start()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise UsageError(
                f"--output_dir {self.directory} cannot be written ({err.strerror}): choose a "
                "writable folder"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.record, f)
        return True

    @staticmethod
    def _read(path: str) -> dict | None:
        """The holder a lock file names; None when it is gone or not (yet) whole."""
        try:
            with open(path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _age(self) -> float:
        try:
            return time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return float("inf")

    def _holder_alive(self, holder: dict) -> bool:
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            return _alive_here(holder["pid"], holder.get("started"))
        return self._age() < STALE_SECONDS

    def _busy(self, holder: dict) -> str:
        where = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "starting"
        if holder.get("host") == self.record["host"]:
            return (
                f"--output_dir {self.directory} is in use by another run ({where}, see "
                f"{self.path}): wait for it to end, or stop it; a run that is gone leaves its "
                "lock to the next"
            )
        return (
            f"--output_dir {self.directory} is in use by another run ({where}, which touched "
            f"{self.path} {self._age():.0f} s ago): if that run is gone, its lock is taken "
            f"over once it is {STALE_SECONDS:.0f} s old"
        )

    def _take_over(self, holder: dict | None) -> None:
        """Removes a dead holder's lock. It is first moved to a name of this process's own, so
        that of several runs taking it over at once one removes it; if what was moved is not
        the lock judged dead (a new holder replaced it meanwhile), it is put back."""
        grave = f"{self.path}.dead{os.getpid()}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # another run took it over first: try to create it again
        if self._read(grave) != holder:
            try:
                os.link(grave, self.path)  # not over a lock created meanwhile
            except OSError:
                pass
        else:
            log.warning(f"{self.path}: taking over the lock of a run that is gone ({holder})")
        os.remove(grave)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            if self._read(self.path) != self.record:
                self.lost = True
                return
            try:
                os.utime(self.path)
            except OSError:  # the folder went away or became read-only: the run will say so
                pass

    def release(self) -> None:
        self._stop.set()
        if self._read(self.path) == self.record:
            os.remove(self.path)


# What train wrote ------------------------------------------------------------------------------

RUN_MARKER = "train_args.json"  # the flags of a train run, written first: the folder is a run's
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
# What a run writes before its first checkpoint (besides its checkpoints folder): a folder
# holding only these (and the lock, and temporary files of writes that were cut off) is a run
# that stopped before it had anything to resume from, and starts over.
BEFORE_FIRST_CHECKPOINT = (
    RUN_MARKER,
    METRICS_FILE,
    TENSORBOARD,
    "skipped_*.jsonl",
    "dataset_images",  # decoded images of an HF dataset: kept, reused
    LOCK_FILE,
)
MODEL_CARD = "README.md"
# What push_to_hub uploads (top-level files only): the model as transformers loads it, with its
# tokenizer and processor files, the model card, the results and the plots. Never the
# checkpoints, the logs (metrics.jsonl, TensorBoard, skipped rows, the flags: they hold local
# paths), the galleries (they embed the data's images) or anything else.
PUBLISHED = (
    "config.json",
    "generation_config.json",
    HF_WEIGHTS,
    NNX_WEIGHTS,
    *AUX_FILES,
    MODEL_CARD,
    *PLOT_FILES,
    "*_results.json",
    "generated_*.json",
)
WRITTEN = (*PUBLISHED, "gallery_*.html", *BEFORE_FIRST_CHECKPOINT)  # top-level names train writes
_TEMPORARY = re.compile(r"(.*)\.tmp(\d+)")  # files.replacing's name while it writes


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def published_files(output_dir: str) -> list[str]:
    """The files of output_dir that push_to_hub uploads."""
    return sorted(
        name
        for name in os.listdir(output_dir)
        if os.path.isfile(os.path.join(output_dir, name)) and _matches(name, PUBLISHED)
    )


def _ours_before_first_checkpoint(output_dir: str, name: str) -> bool:
    if name == CHECKPOINTS:  # only what saves cut off left: no checkpoint, none refused
        folder = os.path.join(output_dir, name)
        return os.path.isdir(folder) and all(
            ".orbax-checkpoint-tmp" in entry for entry in os.listdir(folder)
        )
    return _stale_temporary(name) or _matches(name, BEFORE_FIRST_CHECKPOINT)


def plan(output_dir: str, overwrite: bool, training: bool) -> str:
    """What `train` does in output_dir: "resume" (from its checkpoints), "start over" (a run
    that stopped before its first checkpoint), "fresh" (an empty or new folder, or
    --overwrite_output_dir), or "evaluate" (no --do_train: it only writes its results). A
    folder holding anything else is refused, naming what is there; nothing is deleted here."""
    if not training:
        return "evaluate"
    if overwrite:
        return "fresh"
    if checkpoints(os.path.join(output_dir, CHECKPOINTS)):
        return "resume"
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if not names or names == [LOCK_FILE]:
        return "fresh"
    other = [n for n in names if not _ours_before_first_checkpoint(output_dir, n)]
    if not other:
        return "start over"
    if RUN_MARKER in names:
        refused = os.path.join(output_dir, CHECKPOINTS, REFUSED)
        why = (
            f"its checkpoints were refused (see {refused})"
            if os.path.isdir(refused)
            else "it has no checkpoint to resume from"
        )
        raise UsageError(
            f"--output_dir {output_dir} holds an earlier run, but {why} and the run had "
            f"written more than its first steps ({listing(other)}). Nothing was deleted: pass "
            "--overwrite_output_dir to train from --model_name_or_path again there (its "
            "files are overwritten as the new run writes them), or choose another --output_dir"
        )
    raise UsageError(
        f"--output_dir {output_dir} exists, is not empty ({listing(other)}) and holds neither "
        "a checkpoint to resume from nor an earlier run of this command; pass "
        "--overwrite_output_dir to write there anyway (nothing of yours is deleted)"
    )


def clear_previous_run(output_dir: str) -> list[str]:
    """Before a run starts from scratch (a fresh start over an earlier run, or a start over):
    removes what an earlier run wrote that would be mistaken for this one's: its checkpoints,
    metrics rows and TensorBoard events, and temporary files whose writer is gone.
    Checkpoints in refused/, the flags file, the skipped-row lists (this run has written its
    own by then), the run's decoded dataset images and anything it did not write stay.
    Returns what it removed."""
    removed = []

    def remove(path: str) -> None:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        removed.append(os.path.relpath(path, output_dir))

    folder = os.path.join(output_dir, CHECKPOINTS)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.startswith(f"{STEP_PREFIX}_"):
                remove(os.path.join(folder, name))
    board = os.path.join(output_dir, TENSORBOARD)
    if os.path.isdir(board):
        for name in sorted(os.listdir(board)):
            if name.startswith("events.out.tfevents."):
                remove(os.path.join(board, name))
    if os.path.isfile(os.path.join(output_dir, METRICS_FILE)):
        remove(os.path.join(output_dir, METRICS_FILE))
    removed += remove_stale_temporary_files(output_dir)
    return removed


def _stale_temporary(name: str) -> bool:
    """Whether `name` is the temporary file (files.replacing's NAME.tmpPID) of a file train
    writes, left by a writer that is gone: a run killed while it exported leaves them."""
    found = _TEMPORARY.fullmatch(name)
    if not found or not _matches(found[1], WRITTEN):
        return False
    pid = int(found[2])
    return pid != os.getpid() and not _alive_here(pid, None)


def remove_stale_temporary_files(output_dir: str) -> list[str]:
    """Removes the temporary files of train's writes that were cut off (_stale_temporary)."""
    stale = [name for name in sorted(os.listdir(output_dir)) if _stale_temporary(name)]
    for name in stale:
        os.remove(os.path.join(output_dir, name))
    return stale


def drop_rows_after(output_dir: str, step: int) -> None:
    """metrics.jsonl without the rows of steps after `step`: a resumed run logs those again."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        with replacing(path, encoding="utf-8") as f:
            f.writelines(kept)


def _step_of(line: str) -> float:
    try:
        row = json.loads(line)
    except ValueError:
        return float("inf")  # a line cut off by a kill: dropped
    return row.get("step", 0) if isinstance(row, dict) else float("inf")
