"""Images: files decoded and resized as `ImageProcessor` does, in grain's worker processes
(which hand the pixels back through shared memory), and the `ImageStore` that holds a split's
images: decoded once, all up front or as batches first need them, or per batch when they do
not fit."""

from __future__ import annotations

import functools
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from nnx_caption.processes import gather_json
from nnx_caption.processing import ImageProcessor, load_rgb


def _decode(path: str, processor: ImageProcessor) -> np.ndarray:
    """One file -> (H, W, 3) uint8, converted and resized exactly as ImageProcessor does."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    rgb = processor.resize(load_rgb(path))
    if rgb.shape[:2] != (processor.height, processor.width):  # do_resize is off
        raise ValueError(
            f"image is {rgb.shape[1]}x{rgb.shape[0]}; without resizing the processor needs "
            f"{processor.width}x{processor.height}"
        )
    return rgb


def _reason(error: Exception) -> str:
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {error}"
    return str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"


def _decode_all(
    paths: Sequence[str], processor: ImageProcessor
) -> tuple[np.ndarray, dict[int, str]]:
    """(uint8 (n, H, W, 3), {i: why} of the files that failed, left as zeros)."""
    out = np.zeros((len(paths), processor.height, processor.width, 3), np.uint8)
    failed = {}
    for i, path in enumerate(paths):
        try:
            out[i] = _decode(path, processor)
        except Exception as e:  # whatever goes wrong, it is this file's problem: report, go on
            failed[i] = _reason(e)
    return out, failed


def _probe(path: str) -> None:
    """Cheap checks before training (no decode): the file is there, non-empty, and PIL reads
    its header (a decompression bomb is refused here). Truncated data shows up only when the
    image is decoded."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        image.size  # noqa: B018 - reading the header is the check


def _probe_all(paths: Sequence[str]) -> dict[int, str]:
    """{i: why} of the files that fail _probe, by threads: reading headers waits on storage
    (a network file system's latency), not on a core."""

    def why(path: str) -> str | None:
        try:
            _probe(path)
        except Exception as e:  # this file's problem: report it, go on
            return _reason(e)
        return None

    with ThreadPoolExecutor(16) as pool:
        reasons = pool.map(why, paths, chunksize=64)
        return {i: r for i, r in enumerate(reasons) if r is not None}


# Worker processes -------------------------------------------------------------------------------
# grain's (`mp_prefetch`): fresh processes (spawned, not forked from a parent that runs JAX's
# threads) that hold numpy, PIL and the processor, and no JAX state (the package imports jax,
# which is never initialised there). Each computes its share of the tasks ahead of the consumer
# and hands numpy results back through shared memory; only small values are pickled.


def _exit_with_parent(worker: int, workers: int, parent: int) -> None:
    """grain's worker_init_fn (with `parent`, the pid of the process that starts the workers,
    bound there): a SIGKILLed parent leaves no worker behind. (grain's own workers go on
    without one, and hold the shared memory they write; once they exit, Python's resource
    tracker unlinks it.) The parent's pid comes from the parent, not from getppid() here: a
    parent killed while this worker was still starting has already left it re-parented."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)  # re-parented: the parent is gone

    threading.Thread(target=watch, name="nnx-caption-exit-with-parent", daemon=True).start()


def _drain_shared_memory_deletes() -> None:
    """Waits for grain's unmapping of the shared-memory arrays already dropped: grain hands
    that to a one-thread pool (SharedMemoryArray.enable_async_del(1)), so a task queued now
    runs after them. Without it a pipeline's last blocks may still be mapped when it has
    ended, and unlinked only at exit (by the resource tracker, with a warning)."""
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)


def run_in_workers(fn: Callable[[Any], Any], tasks: Sequence, workers: int) -> Iterator[Any]:
    """fn(task) for each of `tasks` in order: computed ahead by `workers` grain worker processes
    (fn and tasks are pickled to each; a worker takes every workers-th task, in order), or
    here, one task at a time, when workers is 0. The workers stop when the iterator is closed
    or collected."""
    if workers < 1:
        yield from (fn(tasks[i]) for i in range(len(tasks)))
        return
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its settings from absl flags: the defaults
        flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    # One thread a worker (grain's default is a pool of them): a worker takes its tasks in
    # order, which _FirstNeeds relies on; the workers are the parallelism.
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    dataset = grain.MapDataset.source(tasks).map(fn).to_iter_dataset(read)
    init = functools.partial(_exit_with_parent, parent=os.getpid())
    results = iter(dataset.mp_prefetch(options, worker_init_fn=init))
    try:
        yield from results
    finally:
        results.close()
        del results
        # grain's iterators hold reference cycles, and through them the last shared-memory
        # array of each worker: collected now, those are unlinked now, not by Python's
        # resource tracker at exit (with a warning of leaked shared memory).
        gc.collect()
        _drain_shared_memory_deletes()


def _decode_slots(
    slots: np.ndarray, paths: Sequence[str], processor: ImageProcessor, max_pixels: int | None
) -> tuple[np.ndarray, dict[int, str]]:
    """A task: the images paths[slots] (see _decode_all)."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # the parent's limit: a spawned worker has PIL's
    return _decode_all([paths[s] for s in slots], processor)


def _chunks(start: int, stop: int, size: int) -> list[np.ndarray]:
    return [np.arange(first, min(first + size, stop)) for first in range(start, stop, size)]


class _FirstNeeds:
    """A sequence of tasks: [i] the image slots (sorted, once each) that items[i] is the first
    to need. Without a cache, all of its images; with one, those neither cached at the start
    (`cached`) nor needed by an earlier item. It is a function of i, so each worker computes
    its own share; asked in order it costs one pass over the items (a worker, asked every
    workers-th index, computes the ones between: cheap next to decoding)."""

    def __init__(self, items: Sequence[np.ndarray], cached: np.ndarray | None) -> None:
        self.items, self._cached = items, cached
        self._seen, self._next, self._last = None, 0, None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._cached is None:
            return np.unique(self.items[i])
        if i == self._next - 1:
            return self._last
        if self._seen is None or i < self._next:  # from the start
            self._seen, self._next = self._cached.copy(), 0
        for j in range(self._next, i):
            self._seen[self.items[j]] = True
        slots = np.unique(self.items[i])
        self._last = slots[~self._seen[slots]]
        self._seen[slots] = True
        self._next = i + 1
        return self._last


class ImageStore:
    """The images of a split, resized to the processor's size, kept as uint8 (1 byte a value).

    - cache and preload (the split fits): every image decoded now, so that later epochs decode
      nothing and a broken file is skipped before training. Each of the `process` = (index,
      count) processes of a multi-host run decodes its contiguous block of the images, and
      they exchange what failed: all skip the rows one process would, so N processes train
      on what one does. An image a process's batches need later and another's block held is
      decoded then, once;
    - cache without preload: each image decoded the first time a batch needs it, then kept;
    - no cache (larger than memory): each batch decoded when it comes.

    Batch streams (`stream`) decode in `workers` grain processes ahead of the consumer.
    Without preload only the headers are read up front (every process reads the same ones, so
    all agree on the rows); an image that fails later comes back as zeros and is reported in
    `late_failures`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        processor: ImageProcessor,
        workers: int = 2,
        cache: bool = True,
        preload: bool = True,
        process: tuple[int, int] = (0, 1),
    ) -> None:
        self.processor, self.cache, self.workers = processor, cache, workers
        self._paths = list(paths)
        n = len(paths)
        self.decoded = 0  # images this process has decoded, up front and for batches
        self.late_failures: list[tuple[str, str]] = []
        self._images = (
            np.zeros((n, processor.height, processor.width, 3), np.uint8) if cache else None
        )
        self._have = np.zeros(n, bool)  # decoded into the cache
        self._broken = np.zeros(n, bool)  # failed when a batch decoded it
        if cache and preload:
            index, count = process
            chunks = _chunks(index * n // count, (index + 1) * n // count, 16)  # its block
            decoded = self._decoded(chunks)  # not zipped: zip keeps its last tuple (see stream)
            found = {}
            for slots in chunks:
                found.update(self._keep(slots, *next(decoded)))
            decoded.close()  # the workers end now, and with them their shared memory
            if count > 1:  # every process's blocks: all skip the same rows
                found = {int(k): v for block in gather_json(found) for k, v in block.items()}
            self.reasons = dict(sorted(found.items()))
        else:
            self.reasons = _probe_all(self._paths)
        self.ok = np.ones(n, bool)
        self.ok[list(self.reasons)] = False

    def __len__(self) -> int:
        return len(self._paths)

    def _decoded(self, tasks: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, dict]]:
        decode = functools.partial(
            _decode_slots,
            paths=self._paths,
            processor=self.processor,
            max_pixels=Image.MAX_IMAGE_PIXELS,
        )
        return run_in_workers(decode, tasks, self.workers)

    def _keep(self, slots: np.ndarray, images: np.ndarray, failed: dict) -> dict[int, str]:
        """Puts decoded images into the cache; {slot: why} of those that failed."""
        self.decoded += len(slots)
        if self.cache:
            self._images[slots] = images
            self._have[slots] = True
        return {int(slots[i]): why for i, why in failed.items()}

    def pixels(self, slots: np.ndarray) -> np.ndarray:
        """float32 (n, H, W, 3), equal to the processor's output on the same files."""
        return self.pixels_and_failures(slots)[0]

    def pixels_and_failures(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, failed): failed marks images that could not be decoded (zeros instead).
        What is not cached is decoded here, now."""
        slots = np.asarray(slots, np.int64)
        missing = np.unique(slots[~self._have[slots]] if self.cache else slots)
        decoded = None
        if len(missing):
            decoded = _decode_slots(missing, self._paths, self.processor, Image.MAX_IMAGE_PIXELS)
        return self._pixels(slots, missing, decoded)

    def _pixels(
        self, slots: np.ndarray, fresh: np.ndarray, decoded: tuple[np.ndarray, dict] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The batch of `slots`, from the cache or from `decoded`, the images of `fresh`
        (sorted) just decoded."""
        if decoded is not None:
            self._late(self._keep(fresh, *decoded))
        if self.cache:
            images = self._images[slots]
        else:
            images = decoded[0][np.searchsorted(fresh, slots)]
        return self.processor.normalize(images), self._broken[slots]

    def stream(self, items: Sequence[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """pixels_and_failures of items[0], items[1], ... (the image slots of each batch),
        what they need decoded by the workers ahead of the consumer. items is pickled to the
        workers: a list, or a sequence that computes items[i] from i."""
        if self.cache and self._have.all():  # preloaded: nothing to decode
            yield from (self.pixels_and_failures(items[i]) for i in range(len(items)))
            return
        needs = _FirstNeeds(items, self._have.copy() if self.cache else None)
        # Not enumerate(): it keeps its last (i, item) tuple for reuse, and with it the last
        # decoded block's shared memory, until the loop's frame goes, after the pipeline's end.
        i = 0
        for decoded in self._decoded(needs):
            # needs[i] again, here: the workers' copies computed it there
            batch = self._pixels(np.asarray(items[i], np.int64), needs[i], decoded)
            del decoded  # its shared memory is not held while the consumer has the batch
            i += 1
            yield batch

    def _late(self, failed: dict[int, str]) -> None:
        for slot, why in failed.items():
            if not self._broken[slot]:  # reported once
                self.late_failures.append((self._paths[slot], why))
            self._broken[slot] = True
