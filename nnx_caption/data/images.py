"""Images: files decoded and resized as `ImageProcessor` does, in worker processes, and the
`ImageStore` that holds a split's images (decoded once, or per batch when they do not fit)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

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


def _decode_chunk(
    paths: list[str], processor: ImageProcessor, max_image_pixels: int | None
) -> tuple[np.ndarray, dict[int, str]]:
    """Runs in a worker process: numpy and PIL only."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # the parent's limit; a new process has PIL's
    out = np.zeros((len(paths), processor.height, processor.width, 3), np.uint8)
    failed = {}
    for i, path in enumerate(paths):
        try:
            out[i] = _decode(path, processor)
        except Exception as e:  # whatever goes wrong, it is this file's problem: report, go on
            failed[i] = _reason(e)
    return out, failed


def _process_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent runs JAX's threads, and forking a multithreaded process can deadlock.
    # A fork server is a fresh single-threaded process that imports this module once (and with
    # the package, jax: imported, never initialised), so its forked workers start at once.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", __name__])
        return context
    return multiprocessing.get_context("spawn")


def _probe(path: str) -> None:
    """Cheap checks before training (no decode): the file is there, non-empty, and PIL reads
    its header (a decompression bomb is refused here). Truncated data shows up only when the
    image is decoded."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        image.size  # noqa: B018 - reading the header is the check


def _probe_chunk(paths: list[str], max_image_pixels: int | None) -> dict[int, str]:
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    failed = {}
    for i, path in enumerate(paths):
        try:
            _probe(path)
        except Exception as e:  # this file's problem: report it, go on
            failed[i] = _reason(e)
    return failed


class ImageStore:
    """The images of a split, resized to the processor's size.

    cached (the default): decoded once (in worker processes) and kept as uint8, 1 byte per
    value, so later epochs decode nothing. Not cached (datasets larger than memory): only the
    headers are checked up front and each batch is decoded when asked for (train_batches asks
    ahead, in a background thread); an image that fails then comes back as zeros and is
    reported in `late_failures`.
    """

    def __init__(
        self, paths: Sequence[str], processor: ImageProcessor, workers: int = 2, cache: bool = True
    ) -> None:
        self.processor, self.cache, self.workers = processor, cache, workers
        self._paths = list(paths)
        n = len(paths)
        self.reasons: dict[int, str] = {}
        self.late_failures: list[tuple[str, str]] = []
        self._pool = (
            ProcessPoolExecutor(workers, mp_context=_process_context()) if workers > 1 else None
        )
        limit = Image.MAX_IMAGE_PIXELS
        # Chunks amortise the inter-process traffic; several per worker balance the load.
        size = max(1, min(256, -(-n // (max(workers, 1) * 4))))
        starts = range(0, n, size)
        chunks = [self._paths[s : s + size] for s in starts]
        if cache:
            self._images = np.zeros((n, processor.height, processor.width, 3), np.uint8)
            results = self._map(
                _decode_chunk, chunks, [processor] * len(chunks), [limit] * len(chunks)
            )
            for start, (images, failed) in zip(starts, results, strict=True):
                self._images[start : start + len(images)] = images
                self.reasons.update({start + i: why for i, why in failed.items()})
            self.close()  # everything is decoded: the workers are done
        else:
            for start, failed in zip(
                starts, self._map(_probe_chunk, chunks, [limit] * len(chunks)), strict=True
            ):
                self.reasons.update({start + i: why for i, why in failed.items()})
        self.ok = np.ones(n, bool)
        self.ok[list(self.reasons)] = False

    def _map(self, fn, *args):
        if self._pool is not None and len(args[0]) > 1:
            return self._pool.map(fn, *args)
        return map(fn, *args)

    def __len__(self) -> int:
        return len(self._paths)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        """float32 (n, H, W, 3), equal to the processor's output on the same files."""
        return self.pixels_and_failures(indices)[0]

    def pixels_and_failures(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, failed): failed marks images that could not be decoded (zeros instead)."""
        indices = np.asarray(indices)
        if self.cache:
            return self.processor.normalize(self._images[indices]), np.zeros(len(indices), bool)
        paths = [self._paths[i] for i in indices]
        parts = max(1, min(self.workers, len(paths)))
        chunks = [paths[k::parts] for k in range(parts)]  # strided: equal work per worker
        images = np.zeros((len(paths), self.processor.height, self.processor.width, 3), np.uint8)
        failed = np.zeros(len(paths), bool)
        limit = Image.MAX_IMAGE_PIXELS
        results = self._map(_decode_chunk, chunks, [self.processor] * parts, [limit] * parts)
        for k, (decoded, bad) in enumerate(results):
            images[k::parts] = decoded
            for i, why in bad.items():
                failed[k + i * parts] = True
                self.late_failures.append((chunks[k][i], why))
        return self.processor.normalize(images), failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
