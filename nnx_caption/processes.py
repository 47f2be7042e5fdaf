"""Who does what in a multi-process run: every process computes, process 0 decides what one
process must decide (the run directory's lock and plan) and writes the run directory; what
the processes must agree on they agree on through small all-gathers, so that they take the
same branches and meet in the same collectives. With one process each helper is a plain call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def is_main() -> bool:
    """Whether this is process 0: the one that writes the run directory, and logs."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process: every process must call it at the same point (an
    all-gather), and all get the same answer, so they take the same branch."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def gather_json(value: Any) -> list[Any]:
    """Every process's `value` (anything JSON holds), in process order, on every process."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(len(data)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    blocks = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(block[:size])) for block, size in zip(blocks, sizes, strict=True)]


def from_main(fn: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
    """fn() run by process 0 alone; its result (JSON) reaches every process, and so does an
    exception of one of the `errors` types it raised, raised again on each process with the
    same type and message."""
    if jax.process_count() == 1:
        return fn()
    outcome, raised = {}, None
    if is_main():
        try:
            outcome = {"value": fn()}
        except errors as err:
            raised = err
            kind = next(i for i, e in enumerate(errors) if isinstance(err, e))
            outcome = {"error": kind, "message": str(err)}
    outcome = gather_json(outcome)[0]
    if raised is not None:
        raise raised
    if "error" in outcome:
        raise errors[outcome["error"]](outcome["message"])
    return outcome["value"]


def barrier(name: str) -> None:
    """Every process waits here for the others (e.g. until process 0's files are final)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
