"""Training data: caption tables, images decoded once, batches in a resumable order; and the
synthetic "shapes" dataset of the demo.

A split is a csv / json / jsonl table or a Hugging Face `imagefolder` folder (metadata.jsonl)
with an image path and a caption per row. Rows that cannot be used (no image file, no caption)
are skipped and reported; a broken table (not UTF-8, malformed JSON, a missing column) is a
`DataError` before training starts. Targets are encoded exactly as Hugging Face's
run_image_captioning_flax.py encodes them.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import multiprocessing
import os
import queue
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from nnx_caption.processing import ImageProcessor, Tokenizer, _to_rgb

T = TypeVar("T")

IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv")
IMAGEFOLDER_IMAGE_COLUMN = "file_name"


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class Example:
    image: str  # absolute path
    caption: str


@dataclass
class Split:
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("file:row", why)


# ---------------------------------------------------------------------------------------------
# Reading tables
# ---------------------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw.startswith(codecs.BOM_UTF8):  # Excel writes one; it would glue onto the first column
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None


Rows = list[tuple[int, dict[str, Any]]]  # (1-based line or record number, record)


def _csv_rows(path: str, text: str) -> tuple[list[str], Rows]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        columns = list(reader.fieldnames or [])
        for record in reader:
            rows.append((reader.line_num, record))  # the file line, as an editor shows it
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return columns, rows


def _jsonl_rows(path: str, text: str) -> Rows:
    rows = []
    # Not splitlines(): it also splits at U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{number}: malformed JSON line: {e.msg} (column {e.colno})"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {_kind(record)}")
        rows.append((number, record))
    return rows


def _json_rows(path: str, text: str) -> Rows:
    """A list of records, a dict of columns, or JSON lines: what `datasets`' json loader reads."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one value: JSON lines in a .json file
            return _jsonl_rows(path, text)
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        if len({len(v) for v in data.values()}) > 1:
            raise DataError(f"{path}: the columns have different lengths")
        data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {_kind(data)}")
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {number} is {_kind(record)}, not a JSON object")
    return list(enumerate(data, start=1))


TABLE_SUFFIXES = (".csv", ".json", ".jsonl")


def read_table(path: str) -> tuple[list[str], Rows]:
    """(columns, rows) of a .csv / .json / .jsonl table; errors name the file and line."""
    text = _read_text(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        columns, rows = _csv_rows(path, text)
    else:
        rows = (_jsonl_rows if suffix == ".jsonl" else _json_rows)(path, text)
        columns = _columns(rows)
    if not rows:
        raise DataError(f"{path}: no rows")
    return columns, rows


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _columns(rows: Rows) -> list[str]:
    return list(dict.fromkeys(key for _, record in rows for key in record))


def load_split(
    path: str,
    image_column: str = "image",
    caption_column: str = "caption",
    data_dir: str | None = None,
    max_samples: int | None = None,
) -> Split:
    """Examples of one split; rows without an image file or a caption go to `skipped`.

    `path` is a .csv / .json / .jsonl file or an imagefolder (a folder with metadata.jsonl, whose
    image column is `file_name` unless `image_column` exists). Image paths are relative to
    `data_dir`, else to the table's folder. `max_samples` keeps the first N usable rows. A row is
    named "file:N": N is the file line for csv and jsonl, the record number for json.
    """
    path = os.fspath(path)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1, got {max_samples}")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir}: no such folder")

    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in IMAGEFOLDER_METADATA]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise DataError(
                f"{path}: a folder needs {' or '.join(IMAGEFOLDER_METADATA)} (imagefolder layout)"
            )
        table = found[0]
    else:
        table = path
    if os.path.splitext(table)[1].lower() not in TABLE_SUFFIXES:
        raise DataError(f"{path}: expected a .csv, .json or .jsonl file, or an imagefolder folder")
    columns, rows = read_table(table)
    if table != path and image_column not in columns:
        image_column = IMAGEFOLDER_IMAGE_COLUMN  # imagefolder's convention
    for column in (image_column, caption_column):
        if column not in columns:
            raise DataError(f"{table}: no column {column!r} (columns: {', '.join(columns)})")

    base = data_dir if data_dir is not None else os.path.dirname(os.path.abspath(table))
    examples, skipped = [], []
    is_file: dict[str, bool] = {}  # COCO-style tables name each image once per caption
    for number, record in rows:
        where = f"{table}:{number}"
        image, caption = record.get(image_column), record.get(caption_column)
        if not isinstance(image, str) or not image.strip():
            skipped.append((where, f"no image path in column {image_column!r}"))
            continue
        if not isinstance(caption, str):
            skipped.append((where, f"caption in column {caption_column!r} is {_kind(caption)}"))
            continue
        if not caption.strip():
            skipped.append((where, f"empty caption in column {caption_column!r}"))
            continue
        image = os.path.abspath(os.path.join(base, image))
        if image not in is_file:
            is_file[image] = os.path.isfile(image)
        if not is_file[image]:
            skipped.append((where, f"image file not found: {image}"))
            continue
        examples.append(Example(image, caption))
        if max_samples is not None and len(examples) == max_samples:
            break
    if not examples:
        first = "; ".join(f"{w}: {why}" for w, why in skipped[:3])
        raise DataError(f"{table}: no usable rows ({len(skipped)} skipped; first: {first})")
    return Split(examples, skipped)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def shift_tokens_right(
    labels: np.ndarray, pad_token_id: int, decoder_start_token_id: int
) -> np.ndarray:
    """transformers' VisionEncoderDecoder shift_tokens_right, in numpy."""
    shifted = np.zeros_like(labels)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return np.where(shifted == -100, pad_token_id, shifted)


def encode_targets(
    tokenizer: Tokenizer,
    captions: Sequence[str],
    max_target_length: int,
    decoder_start_token_id: int,
    pad_token_id: int,
) -> dict[str, np.ndarray]:
    """labels, decoder_input_ids, decoder_attention_mask: (B, max_target_length) int32.

    As HF's script: "<caption lower-cased> <eos>", truncated (a long caption loses its EOS) and
    padded with `pad_token_id` to max_target_length; inputs are the labels shifted right.
    """
    texts = [caption.lower() + " " + tokenizer.eos_token for caption in captions]
    if not texts:
        empty = np.zeros((0, max_target_length), np.int32)
        return {"labels": empty, "decoder_input_ids": empty, "decoder_attention_mask": empty}
    encoded = tokenizer(texts, max_length=max_target_length, padding="max_length", truncation=True)
    mask = np.asarray(encoded["attention_mask"], np.int32)
    # The tokenizer pads with its own pad (or EOS) token; the model's pad id is the one used.
    labels = np.where(mask == 1, np.asarray(encoded["input_ids"], np.int32), pad_token_id)
    labels = labels.astype(np.int32)
    return {
        "labels": labels,
        "decoder_input_ids": shift_tokens_right(labels, pad_token_id, decoder_start_token_id),
        "decoder_attention_mask": mask,
    }


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _decode(path: str, processor: ImageProcessor) -> np.ndarray:
    """One file -> (H, W, 3) uint8, converted and resized exactly as ImageProcessor does."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("empty file (0 bytes)")
    rgb = _to_rgb(path)
    if processor.do_resize:
        size = (processor.width, processor.height)
        return np.asarray(Image.fromarray(rgb).resize(size, resample=processor.resample))
    if rgb.shape[:2] != (processor.height, processor.width):
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


def normalise(images: np.ndarray, processor: ImageProcessor) -> np.ndarray:
    """(n, H, W, 3) uint8 resized images -> float32, ImageProcessor's rescale and normalise."""
    x = images
    if processor.do_rescale:  # in float64, then float32, as ImageProcessor (and transformers)
        x = (x.astype(np.float64) * processor.rescale_factor).astype(np.float32)
    x = x.astype(np.float32, copy=False)
    if processor.do_normalize:
        mean = np.asarray(processor.image_mean, np.float32)
        std = np.asarray(processor.image_std, np.float32)
        x = (x - mean) / std
    return x


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
            return normalise(self._images[indices], self.processor), np.zeros(len(indices), bool)
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
        return normalise(images, self.processor), failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


# ---------------------------------------------------------------------------------------------
# Datasets and batches
# ---------------------------------------------------------------------------------------------


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
    ) -> None:
        # Each distinct image once: COCO-style tables repeat an image for each of its captions.
        unique = list(dict.fromkeys(e.image for e in split.examples))
        # Cache the resized images when they fit in cache_limit_bytes, else decode per batch.
        cache = len(unique) * processor.height * processor.width * 3 <= cache_limit_bytes
        store = ImageStore(unique, processor, workers, cache=cache)
        slot = {path: i for i, path in enumerate(unique)}
        rows = [slot[e.image] for e in split.examples]
        failed = [
            (e.image, r) for e, r in zip(split.examples, rows, strict=True) if not store.ok[r]
        ]
        self.skipped = list(split.skipped) + [(image, store.reasons[r]) for image, r in failed]
        kept = [i for i, r in enumerate(rows) if store.ok[r]]
        self.examples = [split.examples[i] for i in kept]
        self._images = store
        self._rows = np.asarray([rows[i] for i in kept], np.int64)
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
        """The examples at `indices`. With captions_per_image k, indices come image-major in
        groups of k sharing one image, and pixel_values holds each image once (len / k rows):
        the model encodes it once and its captions share it (see image_groups)."""
        indices = np.asarray(indices)
        pixels, failed = self._images.pixels_and_failures(self._rows[indices[::captions_per_image]])
        failed = np.repeat(failed, captions_per_image)
        out = {"pixel_values": pixels}
        out.update({k: v[indices] for k, v in self._targets.items()})
        if failed.any():  # an image that broke only now: its row stays, its loss does not count
            out["decoder_attention_mask"] = out["decoder_attention_mask"] * ~failed[:, None]
        return out

    def image_groups(self, k: int, seed: int, epoch: int) -> np.ndarray:
        """One epoch as (images, k) example indices: every image once, in random order, with
        k of its captions (a random k when it has more, some repeated when it has fewer). A
        function of (seed, epoch) only, like epoch_order."""
        rng = np.random.default_rng([seed, epoch, k])
        picks = [
            rng.permutation(g)[:k] if len(g) >= k else rng.choice(g, k, replace=True)
            for g in self._captions_by_image
        ]
        return np.stack([picks[i] for i in rng.permutation(len(picks))])

    @functools.cached_property
    def _captions_by_image(self) -> list[np.ndarray]:
        """Example indices of each distinct image's captions, grouped once."""
        if len(self._rows) == 0:
            return []
        by_image = np.argsort(self._rows, kind="stable")
        starts = np.flatnonzero(np.diff(self._rows[by_image])) + 1
        return np.split(by_image, starts)

    @property
    def images(self) -> int:
        """Distinct images (after skipping those that failed to decode)."""
        return len(self._captions_by_image)

    @property
    def late_failures(self) -> list[tuple[str, str]]:
        """Images that passed the up-front check but failed to decode in a batch."""
        return self._images.late_failures

    def steps_per_epoch(self, batch_size: int, captions_per_image: int = 1) -> int:
        """Full batches in an epoch (the last partial batch is dropped): of examples, or with
        captions_per_image k, of batch_size / k images. A DataError when not even one."""
        k = captions_per_image
        if k < 1 or batch_size % k:
            raise DataError(f"a batch of {batch_size} does not split into groups of {k} captions")
        units, what = (self.images, "images") if k > 1 else (len(self), "examples")
        per_batch = batch_size // k
        if per_batch < 1 or units < per_batch:
            raise DataError(f"{units} {what} do not fill one batch of {per_batch}")
        return units // per_batch


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
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(global step, batch) forever from `start_step`, the same batches whether or not the run
    was interrupted: step s is batch s % steps_per_epoch of epoch s // steps_per_epoch.

    captions_per_image 1 (HF's script): an epoch is every example once, each row its own
    image. k > 1: an epoch is every image once with k of its captions (ds.image_groups), each
    batch batch_size / k images encoded once for their k captions."""
    k = captions_per_image
    steps = ds.steps_per_epoch(batch_size, k)  # checked here, before the first batch

    def batches() -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        step, epoch, order = start_step, None, None
        while True:
            if step // steps != epoch:
                epoch = step // steps
                order = (
                    ds.image_groups(k, seed, epoch).reshape(-1)
                    if k > 1
                    else epoch_order(len(ds), seed, epoch)
                )
            position = (step % steps) * batch_size
            yield step, ds.batch(order[position : position + batch_size], k)
            step += 1

    return _prefetch(batches(), prefetch)


def eval_batches(
    ds: CaptionDataset, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(batch, n_real) over every example in order; the last batch is padded up to batch_size
    with copies of its last example, so that every batch has the one compiled shape."""

    def batches() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for start in range(0, len(ds), batch_size):
            indices = np.arange(start, min(start + batch_size, len(ds)))
            padded = np.concatenate([indices, np.full(batch_size - len(indices), indices[-1])])
            yield ds.batch(padded), len(indices)

    return _prefetch(batches(), 2)


# ---------------------------------------------------------------------------------------------
# The synthetic shapes dataset
# ---------------------------------------------------------------------------------------------

# Colours far apart in RGB, jittered a little per image; shapes recognisable at 32x32.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.32}  # radius as a fraction of the image side
PAIR_RADIUS = 0.17  # two shapes, one in each half, are all of one size
SHAPES_VERSION = 1  # bump when the rendering changes, so that old folders are regenerated
SHAPES_MARKER = "shapes.json"
SUPERSAMPLE = 4  # draw larger, then average down: smooth edges
SPLITS = ("train", "validation", "test")

Spec = tuple  # ("one", size, colour, shape) | ("two", (colour, shape), (colour, shape))


def shapes_specs() -> list[Spec]:
    """Every distinct image content; each has exactly one caption."""
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    one = [("one", size, c, s) for size in SIZES for c, s in pairs]
    return one + [("two", left, right) for left in pairs for right in pairs]


def shapes_caption(spec: Spec) -> str:
    if spec[0] == "one":
        _, size, colour, shape = spec
        return f"a {size} {colour} {shape}"
    (c1, s1), (c2, s2) = spec[1], spec[2]
    return f"a {c1} {s1} on the left and a {c2} {s2} on the right"


def _random_spec(rng: np.random.Generator) -> Spec:
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    colours, sizes = list(COLOURS), list(SIZES)
    if rng.random() < 0.4:  # one shape: 30 captions; two shapes: 225, each seen less often
        return ("one", pick(sizes), pick(colours), pick(SHAPES))
    return ("two", (pick(colours), pick(SHAPES)), (pick(colours), pick(SHAPES)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill):
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # about a circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)


def _render(spec: Spec, size: int, rng: np.random.Generator) -> Image.Image:
    """A new rendering of `spec`: background shade, colours, sizes and positions jittered."""
    big = size * SUPERSAMPLE
    background = (int(rng.integers(0, 60)),) * 3
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)

    def colour(name: str) -> tuple[int, ...]:
        jitter = rng.integers(-15, 16, 3)
        return tuple(int(v) for v in np.clip(np.add(COLOURS[name], jitter), 0, 255))

    if spec[0] == "one":
        _, size_name, c, shape = spec
        r = SIZES[size_name] * big * rng.uniform(0.9, 1.1)
        cx, cy = rng.uniform(r + SUPERSAMPLE, big - r - SUPERSAMPLE, 2)
        _draw_shape(draw, shape, cx, cy, r, colour(c))
    else:
        for (c, shape), (low, high) in zip(spec[1:], [(0, big / 2), (big / 2, big)], strict=True):
            r = PAIR_RADIUS * big * rng.uniform(0.9, 1.1)
            cx = rng.uniform(low + r + SUPERSAMPLE, high - r - SUPERSAMPLE)
            cy = rng.uniform(r + SUPERSAMPLE, big - r - SUPERSAMPLE)
            _draw_shape(draw, shape, cx, cy, r, colour(c))
    return image.resize((size, size), Image.Resampling.BOX)


def make_shapes(
    out_dir: str,
    n_train: int = 2000,
    n_validation: int = 200,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 32,
) -> dict[str, str]:
    """Writes the shapes dataset as imagefolders out_dir/{train,validation,test} (PNG files and
    metadata.jsonl with "file_name" and "text"); returns split name -> folder.

    Deterministic: the same arguments give the same bytes, and a folder already complete for
    them is kept as it is. Otherwise those three subfolders are replaced. Every caption of
    validation and test also occurs in train (train starts with one of each, when it can).
    """
    if n_train < 1:
        raise ValueError("make_shapes needs n_train >= 1: validation and test draw from train")
    params = {
        "version": SHAPES_VERSION,
        "n_train": n_train,
        "n_validation": n_validation,
        "n_test": n_test,
        "seed": seed,
        "image_size": image_size,
    }
    folders = {name: os.path.join(out_dir, name) for name in SPLITS}
    marker = os.path.join(out_dir, SHAPES_MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == params:
                return folders
    except (OSError, ValueError):
        pass
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)  # incomplete from here until it is written again

    in_train: set[Spec] = set()
    for index, (name, n) in enumerate(zip(SPLITS, (n_train, n_validation, n_test), strict=True)):
        rng = np.random.default_rng([seed, index])
        if name == "train":
            every = shapes_specs()
            specs = [every[i] for i in rng.permutation(len(every))][:n]
            specs += [_random_spec(rng) for _ in range(n - len(specs))]
            in_train = set(specs)
        else:
            specs = []
            while len(specs) < n:
                spec = _random_spec(rng)
                if spec in in_train:
                    specs.append(spec)
        _write_split(folders[name], specs, image_size, rng)

    with open(marker, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return folders


def _write_split(folder: str, specs: list[Spec], image_size: int, rng: np.random.Generator):
    # Built beside the target and swapped in, so a crash never leaves a half-written split.
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    width = max(5, len(str(len(specs))))
    with open(os.path.join(partial, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, spec in enumerate(specs):
            name = f"{i:0{width}d}.png"
            _render(spec, image_size, rng).save(os.path.join(partial, name), format="PNG")
            meta.write(json.dumps({"file_name": name, "text": shapes_caption(spec)}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def train_caption_tokenizer(captions: Sequence[str], out_dir: str, vocab_size: int = 128) -> None:
    """A small GPT-2-style byte-level BPE trained on the lower-cased captions (as they are
    encoded), "<|endoftext|>" its bos / eos / unk / pad token; loadable with
    `Tokenizer.from_pretrained` and transformers' `AutoTokenizer`."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    eot = "<|endoftext|>"
    # Not GPT-2's full 256-byte alphabet, which alone would outgrow the vocabulary: only the
    # characters of the captions. Others are dropped, with no unk token, as transformers'
    # GPT2Tokenizer (which rebuilds the model without one) drops them: both encode alike.
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eot], show_progress=False)
    # Trained on the text as encode_targets writes it: the space before EOS becomes a token too.
    backend.train_from_iterator([c.lower() + " " for c in captions], trainer)
    Tokenizer(backend, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot).save_pretrained(
        out_dir
    )
