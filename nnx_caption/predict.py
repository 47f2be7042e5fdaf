"""Caption a set of images: `nnx-caption predict` and the `predict()` function behind it.

Inputs are image files, folders, glob patterns and csv / jsonl / json tables with an image column.
Images decode in a thread pool while the model captions the previous batch; every batch has the
same size (the last one is padded) so the search compiles once. An image that cannot be read is
reported and skipped. Results go to predictions.jsonl, skipped.jsonl and a self-contained
gallery.html in the output folder.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

import nnx_caption as nc
from nnx_caption import gallery, processes
from nnx_caption.captioning import Captioner
from nnx_caption.data import TABLE_SUFFIXES, process_rows, read_table
from nnx_caption.errors import UsageError
from nnx_caption.files import replacing
from nnx_caption.flags import ModelArgs
from nnx_caption.metrics import caption_metrics, exact_match
from nnx_caption.processing import load_rgb
from nnx_caption.sharding import make_mesh, put_rows

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# Inputs ---------------------------------------------------------------------------------------

Input = tuple[str, str | None]  # (image path, a reference caption or None)


def _read_table(path: str, column: str, caption_column: str | None) -> list[Input]:
    """(image path, caption) rows of a csv / jsonl / json file, relative image paths taken from
    the file's folder; the caption is None without `caption_column` or when a row has none."""
    columns, rows = read_table(path)
    for flag, name in (("image_column", column), ("caption_column", caption_column)):
        if name is not None and name not in columns:
            raise UsageError(
                f"{path}: no column {name!r} (columns: {', '.join(columns)}); "
                f"choose one with --{flag}"
            )
    found = []
    for number, row in rows:
        value = row.get(column)
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}:{number}: no image path in column {column!r}")
        caption = row.get(caption_column) if caption_column else None
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
        found.append((os.path.join(os.path.dirname(path), value), caption))
    return found


def _expand(arg: str, column: str, caption_column: str | None) -> list[Input]:
    """One INPUT argument -> (image path, caption) pairs, in a stable order."""
    if os.path.isdir(arg):
        found = []
        for root, dirs, files in os.walk(arg):
            dirs.sort()
            found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UsageError(f"{arg}: no images in this folder ({' '.join(IMAGE_EXTENSIONS)})")
        return [(path, None) for path in sorted(found)]
    if os.path.isfile(arg) and arg.lower().endswith(TABLE_SUFFIXES):
        return _read_table(arg, column, caption_column)
    if os.path.lexists(arg):  # a file, or e.g. a broken link: the reader reports it as skipped
        return [(arg, None)]
    matches = sorted(glob.glob(arg, recursive=True))
    if not matches:
        raise UsageError(f"{arg}: no such file or folder, and no file matches it as a glob")
    return [found for match in matches for found in _expand(match, column, caption_column)]


def collect_inputs(
    inputs: list[str],
    column: str = "image",
    limit: int | None = None,
    caption_column: str | None = None,
) -> tuple[list[str], dict[str, list[str]]]:
    """(image paths, references) from INPUT arguments (files, folders, globs, tables), in
    argument order. With `caption_column`, a table's rows of one image are its references and
    the image is captioned once; references maps each image that has some to them."""
    if not inputs:
        raise UsageError("no INPUT given")
    found = [pair for arg in inputs for pair in _expand(os.fspath(arg), column, caption_column)]
    references: dict[str, list[str]] = {}
    for path, caption in found:
        if caption is not None:
            references.setdefault(path, []).append(caption)
    paths = list(dict.fromkeys(p for p, _ in found)) if caption_column else [p for p, _ in found]
    return (paths[:limit] if limit is not None else paths), references


# Decoding -------------------------------------------------------------------------------------


class _Loaded(NamedTuple):
    path: str
    pixels: np.ndarray | None  # (H, W, 3) float32, None when the image could not be read
    thumbnail: str | None  # a data: URI, for the gallery
    error: str | None


def _load(path: str, processor: nc.ImageProcessor, thumbnail: bool) -> _Loaded:
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return _Loaded(path, None, None, "empty file (0 bytes)")
        rgb = load_rgb(path)
        return _Loaded(
            path, processor.preprocess_one(rgb), gallery.thumbnail(rgb) if thumbnail else None, None
        )
    except Exception as err:  # PIL raises many error types on bad files; all mean "skip it"
        cause = err.__cause__ or err  # processing wraps PIL's error: name the original one
        return _Loaded(path, None, None, f"{type(cause).__name__}: {cause}")


def _decode(
    paths: list[str], processor: nc.ImageProcessor, workers: int, ahead: int, thumbnails: list[bool]
) -> Iterator[_Loaded]:
    """_Loaded images in input order (with a thumbnail where `thumbnails` says), decoding up to
    `ahead` images in the background."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for path, thumbnail in zip(paths, thumbnails, strict=True):
            pending.append(pool.submit(_load, path, processor, thumbnail))
            if len(pending) >= ahead:  # bounded, so memory does not grow with the input set
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _batches(
    paths: list[str], batch: int, processor: nc.ImageProcessor, workers: int, gallery_size: int
) -> Iterator[tuple[int, list[tuple[int, _Loaded | None]]]]:
    """(first input index, this process's rows) of each batch of `batch` inputs: each of the N
    processes decodes its contiguous block of batch / N rows (data.process_rows' layout); a
    row past the last input is padding (None)."""
    rows = process_rows(batch, (jax.process_index(), jax.process_count()))
    mine = [(s, [s + r for r in range(rows.start, rows.stop)]) for s in range(0, len(paths), batch)]
    todo = [i for _, indices in mine for i in indices if i < len(paths)]
    stream = _decode(
        [paths[i] for i in todo], processor, workers, 2 * batch + workers,
        [i < gallery_size for i in todo],
    )  # fmt: skip
    for start, indices in mine:
        yield start, [(i, next(stream) if i < len(paths) else None) for i in indices]


# Outputs --------------------------------------------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    """A reader never sees half a file (files.replacing)."""
    with replacing(path, encoding="utf-8") as f:
        f.write(text)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# The job --------------------------------------------------------------------------------------


def predict(
    model_dir: str,
    inputs: list[str],
    output_dir: str,
    *,
    batch_size: int = 8,
    num_beams: int | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    image_column: str = "image",
    caption_column: str | None = None,
    attention_maps: bool = False,
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    gallery_size: int = 1000,
    workers: int | None = None,
    progress: bool = True,
    model_class: str | type | None = None,
    scan_layers: bool = False,
    attention_impl: str = "einsum",
) -> dict[str, Any]:
    """Captions every image in `inputs` with the checkpoint `model_dir` (folder or hub id).

    Writes predictions.jsonl (image, caption, score; input order), skipped.jsonl (image, reason)
    and gallery.html (the first `gallery_size` images) to `output_dir`, and returns a summary.
    Generation settings left None take the checkpoint's generation config; with num_beams > 1
    every beam is kept, as `candidates`. With `caption_column`, a table's captions are the
    references its images are scored against (exact match, CIDEr). `attention_maps` puts each
    caption's cross-attention over its image into the gallery. `model_class` is the edited
    architecture the checkpoint holds (a class, or a --model_class spec); it, `dtype`,
    `revision`, `cache_dir`, `scan_layers` and `attention_impl` mean what the model flags
    (flags.ModelArgs) of every command mean.
    """
    how = ModelArgs(
        model_name_or_path=model_dir,
        revision=revision,
        cache_dir=cache_dir,
        model_class=model_class,
        dtype=dtype,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
    )
    _check(how, batch_size, limit)
    paths, references = collect_inputs(inputs, image_column, limit, caption_column)
    multi = jax.process_count() > 1
    files = _output_files(output_dir)

    start = time.perf_counter()
    search = dict(num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens)
    mesh = make_mesh() if multi else None  # the batch split over every process's devices
    model, captioner, processor = _load_model(how, search, attention_maps, mesh)
    load_seconds = time.perf_counter() - start
    # Fewer images than a batch: no need to pad them up (one process; N split a whole batch).
    batch = batch_size if multi else min(batch_size, len(paths))
    workers = workers or min(8, os.cpu_count() or 1)
    found = _Found(paths, references)
    with tqdm(total=len(paths), unit="img", desc="captioning",
              disable=not (progress and processes.is_main())) as bar:  # fmt: skip
        for first, mine in _batches(paths, batch, processor, workers, gallery_size):
            found.add(model, captioner, first, mine, processor)
            bar.update(min(first + batch, len(paths)) - bar.n)
    seconds = time.perf_counter() - start - load_seconds
    if not found.records:
        if processes.is_main():
            _write_atomic(files["skipped_file"], _jsonl(found.skipped))
        raise UsageError(
            f"none of the {len(paths)} images could be read (reasons in {files['skipped_file']})"
        )
    scores = _scores(found.records) if processes.is_main() else {}
    if processes.is_main():  # process 0 writes: the others took part
        search = captioner.search
        settings = dict(num_beams=search.num_beams, max_length=search.max_length, dtype=dtype,
                        batch_size=batch_size)  # fmt: skip
        _write(files, found, scores, f"nnx-caption predictions: {model_dir}", settings)
    return dict(
        captioned=len(found.records),
        skipped=len(found.skipped),
        load_seconds=load_seconds,
        caption_seconds=seconds,
        images_per_second=len(paths) / max(seconds, 1e-9),
        **scores,
        **files,
    )


def _output_files(output_dir: str) -> dict[str, str]:
    """The files predict writes ({predictions,skipped,gallery}_file), in a folder made now."""
    if processes.is_main():
        os.makedirs(output_dir, exist_ok=True)
    return {
        f"{name}_file": os.path.join(output_dir, f"{name}.{suffix}")
        for name, suffix in (("predictions", "jsonl"), ("skipped", "jsonl"), ("gallery", "html"))
    }


def _check(how: ModelArgs, batch_size: int, limit: int | None) -> None:
    """A UsageError naming the option that cannot work."""
    for name, value in (("batch_size", batch_size), ("limit", limit)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if jax.process_count() > 1 and batch_size % jax.device_count():
        raise UsageError(
            f"--batch_size {batch_size}: a run of {jax.process_count()} processes splits each "
            f"batch over its {jax.device_count()} devices; pass a multiple of that"
        )
    how.check()


def _load_model(
    how: ModelArgs, search: dict, attention_maps: bool, mesh
) -> tuple[nc.VisionEncoderDecoder, Captioner, nc.ImageProcessor]:
    """The checkpoint's model, processor and tokenizer, and its search checked (before any
    image is decoded, rather than at the first batch): every beam comes back."""
    source = how.source()
    model = how.load(source, mesh)
    try:
        processor = nc.ImageProcessor.from_pretrained(source)
        tokenizer = nc.Tokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise nc.CheckpointError(f"{how.model_name_or_path}: {err}") from None
    try:
        captioner = Captioner(
            model.config,
            tokenizer,
            **search,
            all_beams=True,
            attention_maps=attention_maps,
            mesh=mesh,
        )
    except UsageError as err:
        raise UsageError(f"{how.model_name_or_path}: {err}") from None
    return model, captioner, processor


class _Found:
    """What captioning the inputs found, in input order: predictions.jsonl's records, the
    skipped images and the gallery's cards."""

    def __init__(self, paths: list[str], references: dict[str, list[str]]):
        self.paths, self.references = paths, references
        self.records: list[dict] = []
        self.skipped: list[dict] = []
        self.cards: list[gallery.Card] = []

    def add(self, model, captioner: Captioner, first: int, mine, processor) -> None:
        """Captions one batch (first input index, this process's rows): every row, whatever
        failed to decode, so that the compiled search sees one shape and every process puts
        the same number of rows."""
        blank = np.zeros((processor.height, processor.width, 3), np.float32)
        local = np.stack([x.pixels if x and x.pixels is not None else blank for _, x in mine])
        mesh = captioner.mesh
        out = captioner.generate(model, local if mesh is None else put_rows(local, mesh))
        rows = [(i, x.error, x.thumbnail) for i, x in mine if x is not None]
        for i, error, thumbnail in sorted(sum(processes.gather_json(rows), [])):
            path = self.paths[i]
            if error is not None:
                self.skipped.append(dict(image=path, reason=error))
                if processes.is_main():
                    tqdm.write(f"warning: skipped {path}: {error}", file=sys.stderr)
                continue
            found = captioner.caption(out, i - first, maps=bool(thumbnail))
            card = gallery.Card(path, thumbnail, found.caption, found.score,
                                self.references.get(path), found.candidates, found.words,
                                found.maps)  # fmt: skip
            self.records.append(_record(card))
            if thumbnail:
                self.cards.append(card)


def _write(files: dict, found: _Found, scores: dict, title: str, settings) -> None:
    """predictions.jsonl, skipped.jsonl and gallery.html, each whole or not at all."""
    _write_atomic(files["skipped_file"], _jsonl(found.skipped))
    _write_atomic(files["predictions_file"], _jsonl(found.records))
    summary = None
    if scores:
        summary = gallery.summary(scores["exact_match"], scores["CIDEr"])
        summary += f" on the {scores['scored']} images with references"
    page = gallery.page(title, settings, found.cards, len(found.records), summary)
    _write_atomic(files["gallery_file"], page)


def _record(card: gallery.Card) -> dict:
    """A line of predictions.jsonl: the caption and its score; every beam when there are
    several; the references and whether the caption matches one, when there are some."""
    record = dict(image=card.image, caption=card.caption, score=card.score)
    if len(card.candidates) > 1:
        record["candidates"] = [dict(caption=c, score=s) for c, s in card.candidates]
    if card.references is not None:
        record["references"], record["match"] = card.references, card.match
    return record


def _scores(records: list[dict]) -> dict[str, float]:
    """Exact match (%) and CIDEr of the captions that have references; {} when none has."""
    scored = [r for r in records if "references" in r]
    if not scored:
        return {}
    captions, references = [r["caption"] for r in scored], [r["references"] for r in scored]
    cider = caption_metrics(captions, references)["CIDEr"]
    return dict(exact_match=exact_match(captions, references), CIDEr=cider, scored=len(scored))
