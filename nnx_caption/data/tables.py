"""Caption tables: a split read from a csv / json / jsonl table or a Hugging Face `imagefolder`
folder (metadata.jsonl), with an image path and a caption per row.

Rows that cannot be used (no image file, no caption) are skipped and reported; a broken table
(not UTF-8, malformed JSON, a missing column) is a `DataError` before training starts.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

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


KARPATHY_SPLITS = {"train": ("train",), "validation": ("val",), "test": ("test",)}


def _caption_file(path: str, split: str, restval: bool, base: str) -> Rows | None:
    """Rows {"image", "caption"} of a COCO captions file ({images, annotations}: a row per
    annotation) or of a Karpathy split file ({images: [{filepath, filename, split,
    sentences}]}, every split in one file: a row per sentence of `split`'s images, restval
    joining train when asked); None for any other JSON.

    COCO's file names are bare; when the image folder `base` holds the folder that the file's
    name points to (captions_val2017.json: val2017/), they are in there, so that one
    --image_dir (COCO's root) serves both the train and the val file."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError:
        return None  # read_table says where it is malformed
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        return None
    images = data["images"]
    try:
        if isinstance(data.get("annotations"), list):  # COCO
            folder = os.path.basename(path).removeprefix("captions_").removesuffix(".json")
            folder = folder if os.path.isdir(os.path.join(base, folder)) else ""
            names = {image["id"]: os.path.join(folder, image["file_name"]) for image in images}
            return [
                (n, {"image": names.get(note.get("image_id")), "caption": note.get("caption")})
                for n, note in enumerate(data["annotations"], start=1)
            ]
        records = bool(images) and all(isinstance(image, dict) for image in images)
        if records and all("sentences" in image for image in images):  # Karpathy
            wanted = KARPATHY_SPLITS[split] + (("restval",) if restval and split == "train" else ())
            return [
                (
                    n,
                    {
                        "image": os.path.join(image.get("filepath", ""), image["filename"]),
                        "caption": sentence.get("raw"),
                    },
                )  # fmt: skip
                for n, image in enumerate(images, start=1)
                if image.get("split") in wanted
                for sentence in image["sentences"]
            ]
        if records:
            raise DataError(
                f"{path}: has COCO's 'images' but no 'annotations' list of captions (nor "
                "Karpathy's 'sentences' in its images): pass a COCO captions file "
                "(annotations/captions_*.json, not instances_*.json) or a Karpathy split file"
            )
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(
            f"{path}: a COCO captions or Karpathy split file with a malformed entry ({err!r}): "
            "COCO images need id and file_name; Karpathy images filename, split and sentences"
        ) from None
    return None


def load_split(
    path: str,
    image_column: str = "image",
    caption_column: str = "caption",
    data_dir: str | None = None,
    max_samples: int | None = None,
    split: str = "train",
    karpathy_restval: bool = False,
) -> Split:
    """Examples of one split; rows without an image file or a caption go to `skipped`.

    `path` is a .csv / .json / .jsonl file or an imagefolder (a folder with metadata.jsonl, whose
    image column is `file_name` unless `image_column` exists); or a COCO captions file
    (captions_train2017.json) or a Karpathy split file (dataset_coco.json), whose own keys give
    the image and the captions (of `split`: train, validation or test, for a Karpathy file).
    Image paths are relative to `data_dir`, else to the table's folder. `max_samples` keeps the
    first N usable rows. A row is named "file:N": N is the file line for csv and jsonl, the
    record number for json (COCO: the annotation's; Karpathy: the image's).
    """
    path = os.fspath(path)
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be at least 1, got {max_samples}")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir}: no such folder")
    table = _table_of(path)
    base = data_dir if data_dir is not None else os.path.dirname(os.path.abspath(table))
    is_json = table.endswith(".json")
    captions = _caption_file(table, split, karpathy_restval, base) if is_json else None
    if captions is not None:
        if not captions:
            raise DataError(f"{table}: no {split} captions in this COCO / Karpathy file")
        rows, image_column, caption_column = captions, "image", "caption"  # the file's keys
        columns = [image_column, caption_column]
    else:
        columns, rows = read_table(table)
    if table != path and image_column not in columns:
        image_column = IMAGEFOLDER_IMAGE_COLUMN  # imagefolder's convention
    for column in (image_column, caption_column):
        if column not in columns:
            raise DataError(f"{table}: no column {column!r} (columns: {', '.join(columns)})")
    found = _examples(rows, table, base, image_column, caption_column, max_samples)
    if not found.examples:
        first = "; ".join(f"{w}: {why}" for w, why in found.skipped[:3])
        raise DataError(f"{table}: no usable rows ({len(found.skipped)} skipped; first: {first})")
    return found


def _table_of(path: str) -> str:
    """The table file of `path`: itself, or an imagefolder's metadata file."""
    table = path
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in IMAGEFOLDER_METADATA]
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise DataError(
                f"{path}: a folder needs {' or '.join(IMAGEFOLDER_METADATA)} (imagefolder layout)"
            )
        table = found[0]
    if os.path.splitext(table)[1].lower() not in TABLE_SUFFIXES:
        raise DataError(f"{path}: expected a .csv, .json or .jsonl file, or an imagefolder folder")
    return table


def _examples(rows, table: str, base: str, image_column: str, caption_column: str, limit):
    """The rows as a Split: an Example for each usable one (up to `limit`), the reason for
    each skipped one."""
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
        if limit is not None and len(examples) == limit:
            break
    return Split(examples, skipped)
