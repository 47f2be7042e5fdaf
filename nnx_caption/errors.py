"""A run that failed, as opposed to one that was asked for wrongly.

The CLI's exit status says which: 2 for a bad flag, path or input (`UsageError`,
`DataError`, `ConfigError`, `CheckpointError`, ...: nothing ran, fix the command), 1 for a
`RunError` (training diverged, a checkpoint could not be written, the hub refused a push: what
was saved before it is intact, and the message says how to go on), 0 for success and for a
clean stop on SIGTERM.
"""

from __future__ import annotations


class UsageError(Exception):
    """A bad input or option: the CLI prints it and exits with status 2."""


class RunError(Exception):
    """A run that started and could not go on; its message names what failed, what is still
    saved and what to do next."""


class Diverged(RunError):
    """A non-finite loss, gradient norm or state: nothing after the last finite checkpoint was
    saved or exported."""
