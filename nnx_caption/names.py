"""Names as messages and patterns show them: an NNX state path as a dotted string, a list of
names cut short."""

from __future__ import annotations

from collections.abc import Sequence


def path_str(path: tuple) -> str:
    """An NNX state path as the dotted name that new_params, --trainable and --freeze match."""
    return ".".join(map(str, path))


def listing(names: Sequence[str], most: int = 8) -> str:
    """The first `most` names, comma-separated, with ' ...' when there are more."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")
