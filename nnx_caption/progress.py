"""What a person watching a run sees: the first call of each compiled function (compile and
one run) timed and logged once, so that progress bars and throughput can leave it out."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax

T = TypeVar("T")

_COMPILED: set[str] = set()  # what first_call has timed in this process


def log(msg: str) -> None:
    """An info line on stderr, from process 0 alone in a multi-process run."""
    if jax.process_index() == 0:
        print(f"[nnx-caption] {msg}", file=sys.stderr, flush=True)


def first_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs). The first time `what` runs in this process, it also logs how long
    that call took ("compiled train step in 41.2 s"): compiling and one run, which progress
    bars and throughput leave out. Only that first call is waited for."""
    if what in _COMPILED:
        return fn(*args, **kwargs)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    _COMPILED.add(what)
    log(f"compiled {what} in {time.perf_counter() - start:.1f} s (its first call: compile + run)")
    return out
