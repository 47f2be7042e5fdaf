"""Images: files decoded and resized as `ImageProcessor` does, by worker processes that write
into shared memory, and the `ImageStore` that holds a split's images (decoded once, all up
front or as batches first ask for them, or per batch when they do not fit)."""

from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import shared_memory

import numpy as np
from PIL import Image

from nnx_caption.processing import ImageProcessor, _to_rgb


def _decode(path: str, processor: ImageProcessor) -> np.ndarray:
    """One file -> (H, W, 3) uint8, converted and resized exactly as ImageProcessor does."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    rgb = processor.resize(_to_rgb(path))
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


def _decode_all(paths: Sequence[str], processor: ImageProcessor, out: np.ndarray) -> dict[int, str]:
    """Decodes paths[i] into out[i]; returns {i: why} of those that failed (left as zeros)."""
    failed = {}
    for i, path in enumerate(paths):
        try:
            out[i] = _decode(path, processor)
        except Exception as e:  # whatever goes wrong, it is this file's problem: report, go on
            out[i] = 0
            failed[i] = _reason(e)
    return failed


# Worker processes -------------------------------------------------------------------------------
# A worker holds numpy, PIL and the processor: no JAX state (the package imports jax, which is
# never initialised there). It decodes into a block of shared memory that the parent made, so
# pixels never go through a pipe; only file names go in and failures come back.

_attached: dict[str, shared_memory.SharedMemory] = {}  # per worker: the blocks it has opened


def _start_worker(max_image_pixels: int | None, parent: int) -> None:
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # the parent's limit; a new process has PIL's

    def exit_with_parent() -> None:
        # A SIGKILLed parent leaves no worker behind. (Not os.getppid(): a worker's parent is
        # the fork server, which lives as long as its workers do.)
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _decode_into(
    block: str, shape: tuple, start: int, paths: list[str], processor: ImageProcessor
) -> dict[int, str]:
    """Runs in a worker: decodes paths[i] into row start + i of the shared block; returns
    {i: why} of those that failed."""
    if block not in _attached:
        _attached.clear()  # the parent has made a new block: the old one is gone
        _attached[block] = shared_memory.SharedMemory(block)
    rows = np.ndarray(shape, np.uint8, buffer=_attached[block].buf)
    return _decode_all(paths, processor, rows[start:])


def _process_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent runs JAX's threads, and forking a multithreaded process can deadlock.
    # A fork server is a fresh single-threaded process that imports this module once (and with
    # the package, jax: imported, never initialised), so its forked workers start at once.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        return context
    return multiprocessing.get_context("spawn")


class Decoder:
    """Decodes lists of files with `workers` processes (in this process when workers <= 1).

    Workers write into a staging block of shared memory of `block_mb` MB, which the parent
    copies out: its size does not grow with the split's (containers often have a small
    /dev/shm). The block is unlinked when the decoder is closed or collected, and Python's
    resource tracker unlinks it if this process is killed.
    """

    def __init__(self, processor: ImageProcessor, workers: int = 2, block_mb: float = 32):
        self.processor, self.workers = processor, workers
        self.decoded = 0  # images decoded so far (tests count them)
        self._pool = self._block = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=_process_context(),
                initializer=_start_worker,
                initargs=(Image.MAX_IMAGE_PIXELS, os.getpid()),
            )
            image = processor.height * processor.width * 3
            images = max(workers, int(block_mb * 2**20) // image)
            self._shape = (images, processor.height, processor.width, 3)
            self._block = shared_memory.SharedMemory(create=True, size=int(np.prod(self._shape)))
            self._release = weakref.finalize(self, _release, self._pool, self._block)

    def decode(self, paths: Sequence[str]) -> tuple[np.ndarray, dict[int, str]]:
        """(uint8 (n, H, W, 3), {i: why} of the files that failed, zeros in the array)."""
        p = self.processor
        out = np.zeros((len(paths), p.height, p.width, 3), np.uint8)
        self.decoded += len(paths)
        if self._pool is None:
            return out, _decode_all(paths, p, out)
        # The block is a ring of `capacity` rows that tasks of `step` images fill: a task is
        # sent as soon as its rows are free, and its images copied out as soon as it is done
        # (tasks finish about in order), so the workers never wait for a whole block.
        failed: dict[int, str] = {}
        block = np.ndarray(self._shape, np.uint8, buffer=self._block.buf)
        step = max(1, min(16, -(-len(paths) // (self.workers * 4)), self._shape[0]))
        capacity = self._shape[0] // step * step
        pending: collections.deque = collections.deque()  # (first image, rows, task), in order
        sent = 0
        while sent < len(paths) or pending:
            while sent < len(paths) and (not pending or sent + step - pending[0][0] <= capacity):
                rows = slice(sent % capacity, sent % capacity + min(step, len(paths) - sent))
                task = self._pool.submit(
                    _decode_into, self._block.name, self._shape, rows.start,
                    paths[sent : sent + step], p,
                )  # fmt: skip
                pending.append((sent, rows, task))
                sent += step
            first, rows, task = pending.popleft()
            failed.update({first + i: why for i, why in task.result().items()})
            out[first : first + rows.stop - rows.start] = block[rows]
        return out, failed

    def probe(self, paths: Sequence[str]) -> dict[int, str]:
        """{i: why} of the files whose header cannot be read (see _probe), by the workers."""
        if self._pool is None:
            return _probe_all(paths)
        size = max(1, min(1024, -(-len(paths) // (self.workers * 4))))  # balanced, few trips
        starts = range(0, len(paths), size)
        parts = self._pool.map(_probe_all, [paths[s : s + size] for s in starts])
        found = zip(starts, parts, strict=True)
        return {s + i: why for s, part in found for i, why in part.items()}

    def close(self) -> None:
        if self._pool is not None:
            self._release()
            self._pool = self._block = None


def _release(pool: ProcessPoolExecutor, block: shared_memory.SharedMemory) -> None:
    pool.shutdown(cancel_futures=True)
    block.close()
    block.unlink()


def _probe(path: str) -> None:
    """Cheap checks before training (no decode): the file is there, non-empty, and PIL reads
    its header (a decompression bomb is refused here). Truncated data shows up only when the
    image is decoded."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        image.size  # noqa: B018 - reading the header is the check


def _probe_all(paths: Sequence[str]) -> dict[int, str]:
    failed = {}
    for i, path in enumerate(paths):
        try:
            _probe(path)
        except Exception as e:  # this file's problem: report it, go on
            failed[i] = _reason(e)
    return failed


class ImageStore:
    """The images of a split, resized to the processor's size, kept as uint8 (1 byte a value).

    - cache and preload (one process, the split fits): every image decoded now, so that later
      epochs decode nothing and a broken file is skipped before training;
    - cache without preload (each process of a multi-host run): each image decoded the first
      time a batch of this process asks for it, then kept; this process decodes and holds only
      the images its rows were given (the cache's pages are touched only for those);
    - no cache (larger than memory): each batch decoded when asked for.

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
    ) -> None:
        self.processor, self.cache = processor, cache
        self._paths = list(paths)
        n = len(paths)
        self.late_failures: list[tuple[str, str]] = []
        self._decoder = Decoder(processor, workers)
        self._images = (
            np.zeros((n, processor.height, processor.width, 3), np.uint8) if cache else None
        )
        self._have = np.zeros(n, bool)  # decoded into the cache
        self._broken = np.zeros(n, bool)  # failed when a batch decoded it
        if cache and preload:
            self.reasons = self._decode_into_cache(np.arange(n))
            self.close()  # everything is decoded: the workers are done
        else:
            self.reasons = self._decoder.probe(self._paths)
        self.ok = np.ones(n, bool)
        self.ok[list(self.reasons)] = False

    @property
    def decoded(self) -> int:
        """Images this process has decoded (up front and for batches)."""
        return self._decoder.decoded

    def _decode_into_cache(self, slots: np.ndarray) -> dict[int, str]:
        images, failed = self._decoder.decode([self._paths[i] for i in slots])
        self._images[slots] = images
        self._have[slots] = True
        return {int(slots[i]): why for i, why in failed.items()}

    def __len__(self) -> int:
        return len(self._paths)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """float32 (n, H, W, 3), equal to the processor's output on the same files."""
        return self.pixels_and_failures(indices)[0]

    def pixels_and_failures(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, failed): failed marks images that could not be decoded (zeros instead)."""
        indices = np.asarray(indices, np.int64)
        if self.cache:
            missing = np.unique(indices[~self._have[indices]])
            if len(missing):
                self._late(self._decode_into_cache(missing))
            return self.processor.normalize(self._images[indices]), self._broken[indices]
        images, failed = self._decoder.decode([self._paths[i] for i in indices])
        self._late({int(indices[i]): why for i, why in failed.items()})
        return self.processor.normalize(images), self._broken[indices]

    def _late(self, failed: dict[int, str]) -> None:
        for slot, why in failed.items():
            if not self._broken[slot]:  # reported once
                self.late_failures.append((self._paths[slot], why))
            self._broken[slot] = True

    def close(self) -> None:
        """Stops the workers (a later batch that needs an image decodes it in this process)."""
        self._decoder.close()
