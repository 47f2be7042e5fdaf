"""SIGTERM (a preemption notice) turned into a clean stop: the train loop saves a checkpoint at
the next step boundary and the command exits 0; the same command then resumes."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class Preempted(Exception):
    """The run saved a checkpoint after SIGTERM and stopped; the CLI exits 0."""


class Preemption:
    """`with Preemption() as p:` notes SIGTERM; `p.stop_now(step)` at each step boundary says
    whether to stop there.

    In a multi-process run every process must stop at the same step (the others would wait for
    it in the next collective). JAX's preemption service agrees on it: `jax.distributed`
    catches SIGTERM on any host and the coordination service picks the step after the
    furthest host's; until then a check is local, with no collective and no wait for the
    devices. (Where that service is off, the processes agree by an all-gather at every step.)
    """

    def __init__(self) -> None:
        self.asked = False
        self._previous = None
        self._service = False

    def __enter__(self) -> Preemption:
        if jax.process_count() > 1:
            from jax._src import distributed

            self._service = distributed.global_state.preemption_sync_manager is not None
        # The service's own SIGTERM handler must stay; signals reach the main thread only.
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.asked = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop_now(self, step: int) -> bool:
        """Whether to stop after `step` (every process gets the same answer)."""
        from jax.experimental import multihost_utils

        if self._service:
            self.asked = multihost_utils.reached_preemption_sync_point(step)
        elif jax.process_count() > 1:
            self.asked = bool(multihost_utils.process_allgather(np.int32(self.asked)).max())
        return self.asked
