"""Batches: `CaptionDataset` (a split's images and encoded captions), epochs in an order that a
function of (seed, epoch) rebuilds on resume, and the training and evaluation batch streams:
the images they need decoded ahead by grain's workers (`ImageStore.stream`), the batches put
together ahead in a background thread.

In a multi-host run every process walks the same global order (it depends on the seed and the
epoch, not on the process count) and `CaptionDataset.batch` hands back only this process's
contiguous block of each global batch's rows (`process_rows`), decoding only their images:
the layout `jax.make_array_from_process_local_data` puts on the batch axis."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import numpy as np

from nnx_caption.data.images import ImageStore
from nnx_caption.data.tables import DataError, Split
from nnx_caption.data.targets import encode_targets
from nnx_caption.processing import ImageProcessor, Tokenizer

T = TypeVar("T")


class CaptionDataset:
    """A split with its images decoded and its captions encoded, ready to batch."""

    def __init__(
        self,
        split: Split,
        processor: ImageProcessor,
        tokenizer: Tokenizer,
        max_target_length: int,
        decoder_start_token_id: int,
        pad_token_id: int,
        workers: int = 2,
        cache_limit_bytes: float = 2 * 1024**3,
        process: tuple[int, int] = (0, 1),
    ) -> None:
        """`process` (index, count): which rows of each batch are this process's (see
        process_rows). When the images fit the cache, they are decoded up front, each process
        its block of them (ImageStore), and later ones when a batch first needs them."""
        self.process = process
        # Each distinct image once: COCO-style tables repeat an image for each of its captions.
        unique = list(dict.fromkeys(e.image for e in split.examples))
        # Cache the resized images when they fit in cache_limit_bytes, else decode per batch.
        cache = len(unique) * processor.height * processor.width * 3 <= cache_limit_bytes
        store = ImageStore(unique, processor, workers, cache=cache, process=process)
        slot = {path: i for i, path in enumerate(unique)}
        rows = [slot[e.image] for e in split.examples]
        failed = [
            (e.image, r) for e, r in zip(split.examples, rows, strict=True) if not store.ok[r]
        ]
        self.skipped = list(split.skipped) + [(image, store.reasons[r]) for image, r in failed]
        kept = [i for i, r in enumerate(rows) if store.ok[r]]
        self.examples = [split.examples[i] for i in kept]
        self._images = store
        self._image_of = np.asarray([rows[i] for i in kept], np.int64)  # example -> image slot
        self._targets = encode_targets(
            tokenizer,
            [e.caption for e in self.examples],
            max_target_length,
            decoder_start_token_id,
            pad_token_id,
        )

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: np.ndarray, captions_per_image: int = 1) -> dict[str, np.ndarray]:
        """This process's rows of the batch of the examples at `indices` (all of them in a
        one-process run). With captions_per_image k, indices come image-major in groups of k
        sharing one image, and pixel_values holds each image once (len / k rows): the model
        encodes it once and its captions share it (see image_groups)."""
        rows = np.asarray(indices)[process_rows(len(indices), self.process)]
        k = captions_per_image
        return self._assemble(rows, k, *self._images.pixels_and_failures(self._image_of[rows[::k]]))

    def _assemble(
        self, rows: np.ndarray, k: int, pixels: np.ndarray, failed: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The batch of examples `rows` (this process's), their images' pixels given."""
        out = {"pixel_values": pixels}
        out.update({key: v[rows] for key, v in self._targets.items()})
        failed = np.repeat(failed, k)
        if failed.any():  # an image that broke only now: its row stays, its loss does not count
            out["decoder_attention_mask"] = out["decoder_attention_mask"] * ~failed[:, None]
        return out

    def image_groups(self, k: int, seed: int, epoch: int) -> np.ndarray:
        """One epoch as (images, k) example indices: every image once, in random order, with
        k of its captions (a random k when it has more, some repeated when it has fewer). A
        function of (seed, epoch) only, like epoch_order."""
        return _image_groups(self._captions_by_image, k, seed, epoch)

    @functools.cached_property
    def _captions_by_image(self) -> list[np.ndarray]:
        """Example indices of each distinct image's captions, grouped once."""
        if len(self._image_of) == 0:
            return []
        by_image = np.argsort(self._image_of, kind="stable")
        starts = np.flatnonzero(np.diff(self._image_of[by_image])) + 1
        return np.split(by_image, starts)

    def image_rows(self) -> tuple[np.ndarray, list[list[str]]]:
        """(the example of each distinct image's first caption, each image's captions), in
        the order the images first appear: what evaluation captions once per image and
        scores against all of its references (the COCO protocol)."""
        captions: dict[str, list[str]] = {}
        first: dict[str, int] = {}
        for i, example in enumerate(self.examples):
            captions.setdefault(example.image, []).append(example.caption)
            first.setdefault(example.image, i)
        return np.asarray(list(first.values()), np.int64), list(captions.values())

    @property
    def images(self) -> int:
        """Distinct images (after skipping those that failed to decode)."""
        return len(self._captions_by_image)

    @property
    def decoded(self) -> int:
        """Images this process has decoded."""
        return self._images.decoded

    @property
    def late_failures(self) -> list[tuple[str, str]]:
        """Images that passed the up-front check but failed to decode in a batch."""
        return self._images.late_failures

    def steps_per_epoch(
        self, batch_size: int, captions_per_image: int = 1, captions_per_step: str = "all"
    ) -> int:
        """Full batches in an epoch (the last partial batch is dropped): of examples, or of
        batch_size / k images when an epoch goes by image (captions_per_image k > 1, or
        captions_per_step "sample"; see train_batches). A DataError when not even one."""
        k = captions_per_image
        if k < 1 or batch_size % k:
            raise DataError(f"a batch of {batch_size} does not split into groups of {k} captions")
        by_image = _epoch_by_image(k, captions_per_step)
        units, what = (self.images, "images") if by_image else (len(self), "examples")
        per_batch = batch_size // k
        if per_batch < 1 or units < per_batch:
            raise DataError(f"{units} {what} do not fill one batch of {per_batch}")
        return units // per_batch


def _image_groups(captions_by_image: list[np.ndarray], k: int, seed: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, k])
    picks = [
        rng.permutation(g)[:k] if len(g) >= k else rng.choice(g, k, replace=True)
        for g in captions_by_image
    ]
    return np.stack([picks[i] for i in rng.permutation(len(picks))])


CAPTIONS_PER_STEP = ("all", "sample")


def _epoch_by_image(captions_per_image: int, captions_per_step: str) -> bool:
    """Whether an epoch is every image once (else every caption once)."""
    if captions_per_step not in CAPTIONS_PER_STEP:
        raise DataError(
            f"captions_per_step is {captions_per_step!r}, not one of {', '.join(CAPTIONS_PER_STEP)}"
        )
    return captions_per_image > 1 or captions_per_step == "sample"


def process_rows(rows: int, process: tuple[int, int]) -> slice:
    """Process `index` of `count`'s rows of a global batch: its contiguous block of rows // count
    (the block its devices hold on the batch axis)."""
    index, count = process
    if rows % count:
        raise DataError(f"a batch of {rows} rows does not split over {count} processes")
    share = rows // count
    return slice(index * share, (index + 1) * share)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's example order: a function of (seed, epoch) only, so a resume rebuilds it."""
    return np.random.default_rng([seed, epoch]).permutation(n)


_END = object()


def _prefetch(items: Iterator[T], ahead: int) -> Iterator[T]:
    """`items`, produced by a background thread up to `ahead` in advance, so that preparing the
    next batch overlaps the training step. Stops the thread when the consumer stops."""
    if ahead <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((None, e))

    thread = threading.Thread(target=produce, name="nnx-caption-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def train_batches(
    ds: CaptionDataset,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    prefetch: int = 2,
    captions_per_image: int = 1,
    captions_per_step: str = "all",
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(global step, batch) forever from `start_step`, the same batches whether or not the run
    was interrupted: step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.

    captions_per_image 1 and captions_per_step "all" (HF's script): an epoch is every caption
    once, each row its own image. "sample" (big_vision's): an epoch is every image once, with
    one of its captions drawn at random (a new draw each epoch). k > 1: an epoch is every
    image once with k of its captions (ds.image_groups), each batch batch_size / k images
    encoded once for their k captions."""
    k = captions_per_image
    # Checked here, before the first batch.
    steps = ds.steps_per_epoch(batch_size, k, captions_per_step)
    order = _TrainOrder(ds, batch_size, seed, start_step, steps, k, captions_per_step)

    def batches() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i, (pixels, failed) in enumerate(ds._images.stream(order)):
            yield start_step + i, ds._assemble(order.rows(i), k, pixels, failed)

    return _prefetch(batches(), prefetch)


class _TrainOrder:
    """The training batches from `start` as a sequence: [i] the image slots of this process's
    rows of step start + i, rows(i) their examples. A function of i (built from the seed and
    the epoch), so the decoding workers it is pickled to compute their own steps."""

    def __init__(
        self,
        ds: CaptionDataset,
        batch_size: int,
        seed: int,
        start: int,
        steps: int,
        k: int,
        captions_per_step: str,
    ) -> None:
        self.batch_size, self.seed, self.start, self.steps, self.k = (
            batch_size, seed, start, steps, k,
        )  # fmt: skip
        self.examples, self.process, self.slots = len(ds), ds.process, ds._image_of
        by_image = _epoch_by_image(k, captions_per_step)
        self.captions_by_image = ds._captions_by_image if by_image else None
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return 2**62  # forever

    def rows(self, i: int) -> np.ndarray:
        """This process's example indices of step start + i."""
        step = self.start + i
        if step // self.steps != self._epoch:
            self._epoch = step // self.steps
            self._order = (
                epoch_order(self.examples, self.seed, self._epoch)
                if self.captions_by_image is None
                else _image_groups(self.captions_by_image, self.k, self.seed, self._epoch)
            ).reshape(-1)
        position = (step % self.steps) * self.batch_size
        batch = self._order[position : position + self.batch_size]
        return batch[process_rows(self.batch_size, self.process)]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.slots[self.rows(i)[:: self.k]]


def eval_batches(
    ds: CaptionDataset, batch_size: int, rows: np.ndarray | None = None
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch, n_real) over the examples `rows` (default: every one) in order; the last batch
    is padded up to batch_size with copies of its last example, so that every batch has the
    one compiled shape. n_real counts the global batch's real rows; the batch holds this
    process's rows of it (ds.batch)."""
    rows = np.arange(len(ds)) if rows is None else np.asarray(rows)
    blocks, counts = [], []
    for start in range(0, len(rows), batch_size):
        indices = rows[start : start + batch_size]
        padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
        blocks.append(padded[process_rows(batch_size, ds.process)])
        counts.append(len(indices))

    def batches() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        images = ds._images.stream([ds._image_of[b] for b in blocks])
        for b, n, (pixels, failed) in zip(blocks, counts, images, strict=True):
            yield ds._assemble(b, 1, pixels, failed), n

    return _prefetch(batches(), 2)
