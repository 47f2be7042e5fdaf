"""Caption a set of images: `nnx-caption predict` and the `predict()` function behind it.

Inputs are image files, folders, glob patterns and csv / jsonl / json tables with an image column.
Images decode in a thread pool while the model captions the previous batch; every batch has the
same size (the last one is padded) so the search compiles once. An image that cannot be read is
reported and skipped. Results go to predictions.jsonl, skipped.jsonl and a self-contained
gallery.html in the output folder.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

import nnx_caption as nc
from nnx_caption.data import TABLE_SUFFIXES, read_table
from nnx_caption.files import replacing
from nnx_caption.flags import UsageError
from nnx_caption.generate import search_settings
from nnx_caption.hf import resolve
from nnx_caption.processing import _to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
THUMBNAIL_SIZE = 224


# Inputs ---------------------------------------------------------------------------------------


def _read_table(path: str, column: str) -> list[str]:
    """Image paths from a csv / jsonl / json file, relative ones taken from the file's folder."""
    columns, rows = read_table(path)
    if column not in columns:
        raise UsageError(
            f"{path}: no column {column!r} (columns: {', '.join(columns)}); "
            "choose one with --image_column"
        )
    paths = []
    for number, row in rows:
        value = row.get(column)
        if not isinstance(value, str) or not value:
            raise UsageError(f"{path}:{number}: no image path in column {column!r}")
        paths.append(os.path.join(os.path.dirname(path), value))
    return paths


def _expand(arg: str, column: str) -> list[str]:
    """One INPUT argument -> image paths, in a stable order."""
    if os.path.isdir(arg):
        found = []
        for root, dirs, files in os.walk(arg):
            dirs.sort()
            found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UsageError(f"{arg}: no images in this folder ({' '.join(IMAGE_EXTENSIONS)})")
        return sorted(found)
    if os.path.isfile(arg):
        return _read_table(arg, column) if arg.lower().endswith(TABLE_SUFFIXES) else [arg]
    if os.path.lexists(arg):  # e.g. a broken link: let the reader report it as a skipped image
        return [arg]
    matches = sorted(glob.glob(arg, recursive=True))
    if not matches:
        raise UsageError(f"{arg}: no such file or folder, and no file matches it as a glob")
    return [path for match in matches for path in _expand(match, column)]


def collect_inputs(inputs: list[str], column: str = "image", limit: int | None = None) -> list[str]:
    """Image paths from INPUT arguments (files, folders, globs, tables), in argument order."""
    if not inputs:
        raise UsageError("no INPUT given")
    paths = [path for arg in inputs for path in _expand(os.fspath(arg), column)]
    return paths[:limit] if limit is not None else paths


# Decoding -------------------------------------------------------------------------------------


class _Loaded(NamedTuple):
    path: str
    pixels: np.ndarray | None  # (H, W, 3) float32, None when the image could not be read
    thumbnail: str | None  # a data: URI, for the gallery
    error: str | None


def _thumbnail(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _load(path: str, processor: nc.ImageProcessor, thumbnail: bool) -> _Loaded:
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return _Loaded(path, None, None, "empty file (0 bytes)")
        rgb = _to_rgb(path)
        return _Loaded(
            path, processor.preprocess_one(rgb), _thumbnail(rgb) if thumbnail else None, None
        )
    except Exception as err:  # PIL raises many error types on bad files; all mean "skip it"
        cause = err.__cause__ or err  # processing wraps PIL's error: name the original one
        return _Loaded(path, None, None, f"{type(cause).__name__}: {cause}")


def _decode(
    paths: list[str], processor: nc.ImageProcessor, workers: int, ahead: int, thumbnails: int
) -> Iterator[_Loaded]:
    """_Loaded images in input order, decoding up to `ahead` images in the background."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for i, path in enumerate(paths):
            pending.append(pool.submit(_load, path, processor, i < thumbnails))
            if len(pending) >= ahead:  # bounded, so memory does not grow with the input set
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# Outputs --------------------------------------------------------------------------------------


def _write_atomic(path: str, text: str) -> None:
    """A reader never sees half a file (files.replacing)."""
    with replacing(path, encoding="utf-8") as f:
        f.write(text)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _gallery(title: str, settings: dict, records: list[dict], thumbnails: dict[str, str]) -> str:
    esc = html.escape
    shown = [r for r in records if r["image"] in thumbnails]
    cards = "\n".join(
        f'<figure><img src="{thumbnails[r["image"]]}" alt="{esc(r["caption"])}">'
        f"<figcaption><b>{esc(r['caption'])}</b><br>score {r['score']:.4f}"
        f"<br><small>{esc(r['image'])}</small></figcaption></figure>"
        for r in shown
    )
    setting_text = ", ".join(f"{k}={v}" for k, v in settings.items())
    note = f"{len(records)} images" + (
        f", showing the first {len(shown)}" if len(shown) < len(records) else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1em; }}
figure {{ margin: 0; padding: 8px; border: 1px solid #ddd; border-radius: 6px; }}
img {{ display: block; margin: auto; max-width: 224px; max-height: 224px; }}
figcaption {{ margin-top: 6px; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(setting_text)}</p><p>{esc(note)}</p>
<main>
{cards}
</main></body></html>
"""


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
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    gallery_size: int = 1000,
    workers: int | None = None,
    progress: bool = True,
    model_class: str | type | None = None,
) -> dict[str, Any]:
    """Captions every image in `inputs` with the checkpoint `model_dir` (folder or hub id).

    Writes predictions.jsonl (image, caption, score; input order), skipped.jsonl (image, reason)
    and gallery.html (the first `gallery_size` images) to `output_dir`, and returns a summary.
    Generation settings left None take the checkpoint's generation config. `model_class` is
    the edited architecture the checkpoint holds (a class, or a --model_class spec).
    """
    import jax.numpy as jnp  # deferred, as everywhere in the CLI: argument errors stay fast

    if batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    paths = collect_inputs(inputs, image_column, limit)
    os.makedirs(output_dir, exist_ok=True)
    files = {
        "predictions_file": os.path.join(output_dir, "predictions.jsonl"),
        "skipped_file": os.path.join(output_dir, "skipped.jsonl"),
        "gallery_file": os.path.join(output_dir, "gallery.html"),
    }

    start = time.perf_counter()
    directory = resolve(model_dir, revision=revision, cache_dir=cache_dir)
    from nnx_caption.edits import model_class as resolve_class

    model_cls = model_class if isinstance(model_class, type) else resolve_class(model_class)
    model = nc.from_pretrained(directory, dtypes[dtype], model_cls=model_cls)
    try:
        processor = nc.ImageProcessor.from_pretrained(directory)
        tokenizer = nc.Tokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise nc.CheckpointError(f"{model_dir}: {err}") from None
    gen = dict(num_beams=num_beams, max_length=max_length, max_new_tokens=max_new_tokens)
    try:  # checked here, before any image is decoded, rather than by generate() at the first batch
        search, _ = search_settings(model.config, **gen)
    except ValueError as err:
        raise UsageError(f"{model_dir}: {err}") from None
    settings = dict(
        num_beams=search.num_beams, max_length=search.max_length, dtype=dtype, batch_size=batch_size
    )
    load_seconds = time.perf_counter() - start
    batch = min(batch_size, len(paths))  # fewer images than a batch: no need to pad them up
    workers = workers or min(8, os.cpu_count() or 1)

    records: list[dict] = []
    skipped: list[dict] = []
    thumbnails: dict[str, str] = {}
    pending: list[_Loaded] = []

    def caption(items: list[_Loaded]) -> None:
        # Pad a short batch with copies of its last image: the compiled search sees one shape.
        pixels = np.stack([x.pixels for x in items] + [items[-1].pixels] * (batch - len(items)))
        out = nc.generate(model, pixels, **gen)
        texts = tokenizer.batch_decode(out.sequences[: len(items)], skip_special_tokens=True)
        scores = out.scores[: len(items)].tolist()
        for item, text, score in zip(items, texts, scores, strict=True):
            records.append(dict(image=item.path, caption=text.strip(), score=score))
            if item.thumbnail:
                thumbnails[item.path] = item.thumbnail

    bar = tqdm(total=len(paths), unit="img", desc="captioning", disable=not progress)
    with bar:
        for item in _decode(paths, processor, workers, 2 * batch + workers, gallery_size):
            if item.error is not None:
                skipped.append(dict(image=item.path, reason=item.error))
                tqdm.write(f"warning: skipped {item.path}: {item.error}", file=sys.stderr)
                bar.update(1)
                continue
            pending.append(item)
            if len(pending) == batch:
                caption(pending)
                bar.update(len(pending))
                pending = []
        if pending:
            caption(pending)
            bar.update(len(pending))
    seconds = time.perf_counter() - start

    _write_atomic(files["skipped_file"], _jsonl(skipped))
    if not records:
        raise UsageError(
            f"none of the {len(paths)} images could be read (reasons in {files['skipped_file']})"
        )
    _write_atomic(files["predictions_file"], _jsonl(records))
    title = f"nnx-caption predictions: {model_dir}"
    _write_atomic(files["gallery_file"], _gallery(title, settings, records, thumbnails))
    return dict(
        captioned=len(records),
        skipped=len(skipped),
        load_seconds=load_seconds,
        caption_seconds=seconds - load_seconds,
        images_per_second=len(paths) / max(seconds - load_seconds, 1e-9),
        **files,
    )
