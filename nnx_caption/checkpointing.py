"""Training checkpoints: a (model, optimizer) state as orbax-checkpoint sharded arrays, written
in the background, each array with a checksum that a restore verifies.

- Each process writes and reads only its own shards; a step folder appears complete or not at
  all (orbax writes a temporary folder and renames it when done).
- A save refuses a state holding NaN or Inf, and one the disk has no room for: that is checked
  before writing, since a write that fails midway also leaves tensorstore's threads printing
  asyncio tracebacks.
- A save that fails in the background is raised by `raise_if_failed`, which a train loop calls
  at every step boundary (cheap: it reads a flag), not only at the next save.
- Checksums: one uint32 per array, computed on the devices from the array's bits before the
  next step donates its buffers: a wrap-around sum over the elements of a hash of (bits,
  index). Integer sums do not depend on the order of the reduction, so the value is the same
  on any mesh, and a checkpoint restores (verified) onto another mesh or device count.
- A checkpoint that fails its checks is moved into `refused/` beside the others (kept, for a
  look, never deleted), and `restore_newest` goes on to the one before it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax import lax
from jax.experimental import multihost_utils

from nnx_caption.errors import Diverged, RunError
from nnx_caption.names import listing, path_str
from nnx_caption.processes import any_process
from nnx_caption.safetensors_io import CheckpointError, NonFiniteError

log = logging.getLogger(__name__)

STEP_PREFIX = "step"  # checkpoints are step_00000008 and so on
REFUSED = "refused"  # where checkpoints that failed their checks are moved, in the same folder
SAVE_MARGIN_BYTES = 2**20  # orbax's metadata files, beside the arrays themselves


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read or do not match their checksums."""


class SaveFailed(RunError):
    """A checkpoint could not be written; the ones before it are intact."""


def step_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"{STEP_PREFIX}_{step:08d}")


def checkpoints(directory: str) -> list[str]:
    """Complete checkpoints in `directory`, oldest first (a save in progress or killed midway
    has a temporary name until orbax commits it)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(rf"{STEP_PREFIX}_\d{{8}}", n))
    return [
        os.path.join(directory, n)
        for n in names
        if os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA"))
    ]


# Checksums ------------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
    """The bits of each element as a uint32 (16- and 8-bit types widened, keys as their data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
    """murmur3's finalizer: a bijection of uint32 in which every input bit moves every output
    bit, so that no change to one element cancels out in the sum."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _checksum(x: jax.Array) -> jax.Array:
    """uint32 (): the array's checksum. The element index enters the hash, so that moved
    elements change it too; it is built from iotas, which XLA shards with the array."""
    words = _words(x)
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for dim in reversed(range(words.ndim)):
        iota = lax.broadcasted_iota(jnp.uint32, words.shape, dim)
        index, stride = index + iota * jnp.uint32(stride % 2**32), stride * words.shape[dim]
    return jnp.sum(_mix(words + index * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)


@jax.jit
def _fingerprint(arrays: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(uint32 (n,) checksums, bool (n,) finite: no NaN or Inf) of n arrays, in one program
    and one transfer, not one per array (nor many small programs with collectives in flight
    at once, which can deadlock XLA's CPU collectives)."""
    # x * 0 is NaN exactly where x is NaN or Inf, and a sum holds a NaN whatever its order: a
    # float sum, which XLA runs 3-4x faster than the elementwise test's all() on CPU.
    finite = [
        jnp.isfinite(jnp.sum(a * 0)) if jnp.issubdtype(a.dtype, jnp.inexact) else jnp.bool_(True)
        for a in arrays
    ]
    return jnp.stack([_checksum(a) for a in arrays]), jnp.stack(finite)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated result on the host, also when it spans other processes' devices."""
    return np.asarray(x.addressable_data(0) if not x.is_fully_addressable else x)


def fingerprint(state: nnx.State) -> dict[str, tuple[int, bool]]:
    """{NNX path: (checksum, finite)} of every array of `state`."""
    flat = [(path_str(path), var[...]) for path, var in nnx.to_flat_state(state)]
    sums, finite = _fingerprint([array for _, array in flat])
    sums, finite = _host(sums), _host(finite)
    return {name: (int(s), bool(f)) for (name, _), s, f in zip(flat, sums, finite, strict=True)}


def _layout(state: nnx.State) -> dict[str, list]:
    """{NNX path: [shape, dtype]}: what a restore must find in a checkpoint."""
    return {
        path_str(path): [list(var[...].shape), str(var[...].dtype)]
        for path, var in nnx.to_flat_state(state)
    }


# Errors of the writer -------------------------------------------------------------------------


def _cause(err: BaseException) -> str:
    """What went wrong, in a few words: the OS error where there is one (tensorstore puts it in
    its message as os_error_code), else the first line of the message."""
    while err is not None:
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        found = re.search(r"os_error_code='(\d+)'", str(err))
        if found:
            return os.strerror(int(found.group(1)))
        if err.__cause__ is None and err.__context__ is None:
            break
        err = err.__cause__ or err.__context__
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _last_complete(directory: str) -> str:
    done = checkpoints(directory)
    return done[-1] if done else "none"


_QUIETED = False


def _through_orbax(tb) -> bool:
    while tb is not None:
        if "orbax" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def quiet_failed_writes() -> None:
    """For the CLI, whose errors are one line each: a checkpoint save that fails in the
    background is reported as one error (SaveFailed); what orbax's and tensorstore's threads
    print about it besides is dropped: orbax's logged tracebacks (absl ERROR records from
    orbax's modules), asyncio's "Task exception was never retrieved" of its failed writes,
    "Event loop is closed" from tensorstore callbacks that outlive orbax's loop, and its
    coroutines cut off at exit."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    default = sys.unraisablehook

    def hook(unraisable) -> None:
        err, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        closed = isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
        if not (closed or (code is not None and "orbax" in code.co_filename)):
            default(unraisable)

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return "orbax" not in record.pathname and not (
            record.exc_info and _through_orbax(record.exc_info[2])
        )

    def keep_asyncio(record: logging.LogRecord) -> bool:
        # The package runs no asyncio of its own: only orbax's writes leave these.
        return "exception was never retrieved" not in record.getMessage()

    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(keep)
    logging.getLogger("asyncio").addFilter(keep_asyncio)


class Checkpointer:
    """The checkpoints of one run's state: an orbax CheckpointManager per folder, kept between
    saves (it holds the background writes in flight)."""

    def __init__(self) -> None:
        self._managers: dict[str, tuple[int | None, object]] = {}  # folder -> (keep, manager)
        self._writing: dict[str, int] = {}  # folder -> the step its last save wrote

    def _manager(self, directory: str, keep: int | None = None):
        directory = os.path.abspath(directory)
        kept, manager = self._managers.get(directory, (None, None))
        if manager is not None and keep is not None and kept != keep:
            self._finish(directory, manager)  # another limit: a manager that keeps it
            manager.close()
            manager = None
        if manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep or None,
                step_prefix=STEP_PREFIX,
                step_format_fixed_length=8,
                enable_async_checkpointing=True,
                cleanup_tmp_directories=True,  # what a save killed midway left behind
            )
            manager = ocp.CheckpointManager(
                directory, options=options, item_names=("state", "meta")
            )
            self._managers[directory] = keep, manager
        return manager

    def save(
        self,
        directory: str,
        step: int,
        state: nnx.State,
        meta: dict,
        keep: int | None = None,
        block: bool = True,
    ) -> str:
        """Writes step_<step>/ in `directory` (the newest `keep` are kept; all when None) and
        returns its path. Every process must call it. `block=False` returns once the arrays are
        off the devices and writes in the background. Refused (nothing written) when the state
        holds NaN or Inf, or when the disk has no room for it."""
        directory = os.path.abspath(directory)
        path = step_path(directory, step)
        manager = self._manager(directory, keep)
        if step in manager.all_steps():  # a step is saved once
            return path
        prints = fingerprint(state)
        bad = [name for name, (_, finite) in prints.items() if not finite]
        if bad:
            raise Diverged(f"not saving {path}: {listing(bad)} hold NaN or Inf")
        self._finish(directory, manager)  # the save before: orbax would wait for it anyway
        self._check_room(directory, path, state)
        layout = _layout(state)
        arrays = {name: [*layout[name], prints[name][0]] for name in layout}
        meta = {**meta, "arrays": arrays}  # [shape, dtype, checksum] by NNX path
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            manager.save(step, args=ocp.args.Composite(**items))
        except Exception as err:  # what orbax's synchronous part of the write raised
            raise self._failed(directory, manager, err) from None
        self._writing[directory] = step
        if block:
            self._finish(directory, manager)
        return path

    def _check_room(self, directory: str, path: str, state: nnx.State) -> None:
        """SaveFailed, on every process, when any process's disk cannot hold the state."""
        needed = sum(x.nbytes for x in jax.tree.leaves(state)) + SAVE_MARGIN_BYTES
        os.makedirs(directory, exist_ok=True)
        free = shutil.disk_usage(directory).free
        if any_process(free < needed):
            where = (
                f"{directory} has {free / 2**20:.1f} MiB free"
                if free < needed
                else ("another process's disk is that full")
            )
            raise SaveFailed(
                f"no room to save {path}: it needs up to {needed / 2**20:.1f} MiB and {where}. "
                f"The last complete checkpoint is {_last_complete(directory)}: free some "
                "space and run the same command to resume from it"
            )

    def _finish(self, directory: str, manager) -> None:
        """Waits for the folder's background write; SaveFailed if it failed."""
        try:
            manager.wait_until_finished()
        except Exception as err:  # orbax re-raises whatever its writer thread raised
            raise self._failed(directory, manager, err) from None

    def _failed(self, directory: str, manager, err: Exception) -> SaveFailed:
        """The SaveFailed of a folder whose last save raised `err`; its manager is closed
        (its writer threads wound up) and dropped: a later save starts a new one."""
        step = self._writing.get(directory)
        with contextlib.suppress(Exception):
            manager.close()
        self._managers.pop(directory, None)
        return SaveFailed(
            f"saving {step_path(directory, step)} failed: {_cause(err)}. The last complete "
            f"checkpoint is {_last_complete(directory)}; once the cause is fixed, the same "
            "command resumes from it"
        )

    def raise_if_failed(self) -> None:
        """SaveFailed if a background save has failed since the last call; returns at once
        while one is still being written."""
        for directory, (_, manager) in self._managers.items():
            if not manager.is_saving_in_progress():
                self._finish(directory, manager)

    def wait(self) -> None:
        """Waits for every background save; SaveFailed if one failed."""
        for directory, (_, manager) in self._managers.items():
            self._finish(directory, manager)

    def restore(self, checkpoint: str, like: nnx.State) -> tuple[nnx.State, dict]:
        """(state, meta) of a step_<N>/ folder, onto the shardings of `like` (a checkpoint
        saved on another mesh or device count restores too); each process reads only its own
        shards. CheckpointError when it holds other arrays than `like` (another model, or
        other --freeze / --lora_rank flags); DamagedCheckpoint when its files cannot be read
        or do not match their checksums; NonFiniteError when it holds NaN or Inf."""
        self.wait()
        directory, name = os.path.split(os.path.abspath(checkpoint))
        step = int(name.removeprefix(f"{STEP_PREFIX}_"))
        manager = self._manager(directory)
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as err:  # orbax raises many kinds on damaged files, bare Exception too
            raise DamagedCheckpoint(
                f"{checkpoint}: cannot read its metadata: {_cause(err)}"
            ) from None
        saved = meta.get("arrays")  # None: written by an nnx-caption without checksums
        want = _layout(like)
        if saved is not None and {k: v[:2] for k, v in saved.items()} != want:
            differ = sorted(set(saved) ^ set(want)) or [k for k in want if saved[k][:2] != want[k]]
            raise CheckpointError(
                f"{checkpoint} holds other arrays than this run trains ({listing(differ)}): it "
                "was saved by a run with another model or other --freeze / --trainable / "
                "--lora_rank / --scan_layers flags. Run with the flags it was trained with, or "
                "pass --overwrite_output_dir to start over"
            )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
        )
        items = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        try:
            state = manager.restore(step, args=items)["state"]
        except Exception as err:  # as above: orbax's errors on unreadable data
            raise DamagedCheckpoint(f"{checkpoint}: cannot restore it: {_cause(err)}") from None
        prints = fingerprint(state)
        bad = [n for n, (checksum, _) in prints.items() if saved and saved[n][2] != checksum]
        if bad:
            raise DamagedCheckpoint(
                f"{checkpoint}: {len(bad)} of {len(prints)} arrays differ from the checksums "
                f"saved with them ({listing(bad)}): its files were changed or damaged after "
                "it was written"
            )
        for name, (_, finite) in prints.items():  # only checkpoints without checksums
            if not finite:
                raise NonFiniteError(
                    f"{checkpoint}: {name!r} holds NaN or Inf: the run had diverged when this "
                    f"checkpoint was saved. Move {checkpoint} away to resume from the one "
                    "before it"
                )
        if saved is None:
            log.warning(f"{checkpoint} was saved without checksums: restored unverified")
        return state, meta

    def restore_newest(self, directory: str, like: nnx.State) -> tuple[nnx.State, dict, str]:
        """restore() of the newest checkpoint in `directory` that passes its checks; each one
        refused on the way is moved into refused/ and logged. CheckpointError when none is
        left (or none was there)."""
        refused = []
        for path in reversed(checkpoints(directory)):
            error = None
            try:
                state, meta = self.restore(path, like)
            except (DamagedCheckpoint, NonFiniteError) as err:
                error = err
            if not any_process(error is not None):
                return state, meta, path
            moved = self._set_aside(path)
            reason = str(error) if error else "another process could not restore it"
            log.warning(f"refused {reason.removeprefix(path + ': ')} (moved to {moved})")
            refused.append(os.path.basename(path))
        raise CheckpointError(
            f"no checkpoint in {directory} can be restored"
            + (
                f" (refused and moved to {os.path.join(directory, REFUSED)}: {listing(refused)})"
                if refused
                else ""
            )  # fmt: skip
            + ": pass --overwrite_output_dir to start over from --model_name_or_path"
        )

    def _set_aside(self, path: str) -> str:
        """Moves a refused checkpoint into refused/ (process 0, for all) and returns where."""
        directory, name = os.path.split(path)
        target = os.path.join(directory, REFUSED, name)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            n = 1
            while os.path.exists(target):  # refused before: keep both
                n += 1
                target = os.path.join(directory, REFUSED, f"{name}.{n}")
            os.rename(path, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"nnx-caption refused {name}")
        self._manager(directory).reload()  # orbax lists the steps it has seen
        return target
