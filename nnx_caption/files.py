"""Files that appear whole or not at all: each is written to a temporary name beside it and
renamed over the old one when complete, so a crash mid-save leaves the previous file intact."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import IO


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
