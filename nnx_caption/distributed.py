"""Joining a multi-process run: `train`, `predict` and `bench` as N processes (jax.distributed)
on a TPU pod slice, a GPU cluster or localhost.

Each process is started with the same command. The three flags name the run as
jax.distributed.initialize names it (--coordinator_address HOST:PORT, process 0's host and a
free port, or JAX_COORDINATOR_ADDRESS; --num_processes; --process_id). Without them jax's own
cluster detection decides (Cloud TPU, SLURM, Open MPI, GKE), and where it detects none the
command runs as one process, as always. This runs before anything touches a jax backend.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import socket
import time

import jax

from nnx_caption.errors import RunError, UsageError
from nnx_caption.options import at_least, check_flags, flag

log = logging.getLogger(__name__)

ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"  # jax reads it too


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """How this process joins a multi-process run (jax.distributed). Without these flags, jax's
    cluster detection (Cloud TPU, SLURM, Open MPI, GKE) decides, else one process runs."""

    coordinator_address: str | None = flag(
        None,
        f"HOST:PORT of process 0's coordinator, the same for every process (or {ADDRESS_ENV}); "
        "with --num_processes and --process_id",
    )
    num_processes: int | None = flag(None, "how many processes the run has", at_least(1))
    process_id: int | None = flag(
        None, "this process's index, 0 to --num_processes - 1", at_least(0)
    )
    initialization_timeout: int = flag(
        120, "seconds a process waits for all of them to reach the coordinator", at_least(1)
    )
    heartbeat_timeout: int = flag(
        100,
        "seconds after which the others stop when a process is lost (it died, its host went "
        "down): jax ends them, and the same commands resume from the last checkpoint",
        at_least(1),
    )


def start(a: DistributedArgs) -> None:
    """Joins the run `a` describes, or the one jax detects; nothing when there is none. A
    UsageError for flags that cannot name a run, a RunError when the coordinator cannot be
    reached in time."""
    check_flags(a)
    address = a.coordinator_address or os.environ.get(ADDRESS_ENV)
    named = {"--num_processes": a.num_processes, "--process_id": a.process_id}
    if a.coordinator_address or any(v is not None for v in named.values()):
        missing = [k for k, v in {"--coordinator_address": address, **named}.items() if v is None]
        if missing:
            raise UsageError(
                f"a multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id together; missing {', '.join(missing)}"
            )
        if a.process_id >= a.num_processes:
            raise UsageError(
                f"--process_id {a.process_id}: processes are numbered 0 to "
                f"{a.num_processes - 1} (--num_processes {a.num_processes})"
            )
    accepted = inspect.signature(jax.distributed.initialize).parameters  # across jax versions
    timeouts = {
        k: v
        for k, v in dict(
            initialization_timeout=a.initialization_timeout,
            heartbeat_timeout_seconds=a.heartbeat_timeout,
        ).items()
        if k in accepted
    }
    detect = address is None
    if not detect and a.process_id is not None:
        log.info(
            f"process {a.process_id} of {a.num_processes}: joining the run at {address} "
            f"(waiting up to {a.initialization_timeout} s for the others)"
        )
        if a.process_id != 0:  # jaxlib aborts the process when it cannot connect: say why first
            _wait_for_coordinator(address, a)
    try:
        jax.distributed.initialize(address, a.num_processes, a.process_id, **timeouts)
    except Exception as err:  # jax's ValueErrors, and jaxlib's errors of the coordinator
        message = str(err)
        if detect and "coordinator_address should be defined" in message:
            return  # no cluster detected: one process
        if detect and "must be called before any JAX" in message:
            return  # jax already runs in this process (the API, called from a program): one
        if isinstance(err, ValueError):
            raise UsageError(f"jax.distributed: {message}") from None
        where = address or "the coordinator jax detected"
        raise RunError(
            f"process {a.process_id if a.process_id is not None else '?'} could not join the "
            f"run at {where} within --initialization_timeout {a.initialization_timeout} s: "
            f"{message.splitlines()[0] if message else type(err).__name__}. Start every "
            "process with the same --coordinator_address (process 0's host, a free port)"
        ) from None
    if jax.process_index() == 0:
        log.info(
            f"{jax.process_count()} processes: {jax.local_device_count()} local and "
            f"{jax.device_count()} global devices ({jax.devices()[0].platform}). A process "
            f"lost stops the others within --heartbeat_timeout {a.heartbeat_timeout} s (jax "
            "ends them); the same commands then resume from the last checkpoint"
        )


def _wait_for_coordinator(address: str, a: DistributedArgs) -> None:
    """Until something accepts connections at `address` (process 0's coordinator), for at most
    --initialization_timeout; a RunError naming the address after that. jax's own connect
    would end the process from C++ with no word of where it tried."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + a.initialization_timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RunError(
                    f"process {a.process_id} of {a.num_processes}: nothing answers at {address} "
                    f"after --initialization_timeout {a.initialization_timeout} s "
                    f"({err.strerror or err}). Start process 0 with the same "
                    "--coordinator_address: its host, reachable from every process, and a free "
                    "port"
                ) from None
        time.sleep(0.5)
