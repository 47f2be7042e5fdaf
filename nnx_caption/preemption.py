"""SIGTERM (a preemption notice) turned into a clean stop: the train loop saves a checkpoint at
the next step boundary and the command exits 0; the same command then resumes."""

from __future__ import annotations

import signal
import threading

from nnx_caption.processes import any_process


class Preempted(Exception):
    """The run saved a checkpoint after SIGTERM and stopped; the CLI exits 0."""


class Preemption:
    """`with Preemption() as p:` notes SIGTERM; `p.stop_now()` at a step boundary says whether
    to stop there. In a multi-process run every process must stop at the same step (the others
    would wait for it in the next collective), so the processes agree by an all-gather."""

    def __init__(self) -> None:
        self.asked = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.asked = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop_now(self) -> bool:
        return any_process(self.asked)
