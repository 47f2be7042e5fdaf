"""The small files around a checkpoint and a run: JSON objects read with errors that name
the file, and files that appear whole or not at all (each is written to a temporary name
beside it and renamed over the old one when complete, so a crash mid-save leaves the previous
file intact)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import IO


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict | None:
    """The JSON object in the file at `path`, None when there is no such file. A file that is
    not UTF-8 JSON holding an object raises `error`, naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise error(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object")
    return data


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`with replacing(path) as f:` writes f; `path` changes only when the block completes."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the block raised: the old file stays, the partial one goes
            os.remove(tmp)


def copy_file(src: str, dst: str) -> None:
    """shutil.copyfile, atomically."""
    with open(src, "rb") as source, replacing(dst, "wb") as target:
        shutil.copyfileobj(source, target)


def write_json(directory: str | os.PathLike, name: str, data: dict) -> None:
    """`directory/name` as indented, key-sorted JSON, atomically (transformers' config files)."""
    os.makedirs(directory, exist_ok=True)
    with replacing(os.path.join(directory, name), encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
