"""The per-step cost of agreeing on a preemption stop in a two-process run (jax.distributed,
gloo, on this machine): nnx_caption.preemption.Preemption.stop_now, which asks JAX's
preemption service, against the all-gather of a flag that it used before (and still falls
back to where the service is off), in one run.

    .venv/bin/python benchmarks/preemption.py [--steps 300] [--rounds 3]

Each round times --steps calls of each; the figures are medians of the rounds. An all-gather
also waits for the devices to finish what was queued before it, which this does not count:
here nothing is queued.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from common import RESULTS_DIR, machine, machine_line, update_results_md


def worker(port: str, process: int, steps: int, rounds: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from nnx_caption.preemption import Preemption

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process)
    multihost_utils.process_allgather(np.int32(0))  # compiled and connected
    times = {"all_gather_ms": [], "service_ms": []}
    with Preemption() as preemption:
        assert preemption._service, "JAX's preemption service is off"
        for r in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                bool(multihost_utils.process_allgather(np.int32(0)).max())
            times["all_gather_ms"].append((time.perf_counter() - start) / steps * 1e3)
            start = time.perf_counter()
            for i in range(steps):
                preemption.stop_now(r * steps + i)
            times["service_ms"].append((time.perf_counter() - start) / steps * 1e3)
    if process == 0:
        print(json.dumps({k: statistics.median(v) for k, v in times.items()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker[:1], int(args.worker[1]), args.steps, args.rounds)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [sys.executable, __file__, "--steps", str(args.steps), "--rounds", str(args.rounds)]
    procs = [
        subprocess.Popen([*command, "--worker", port, str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    result = json.loads(outs[0].strip().splitlines()[-1])
    result.update(machine=machine(), steps=args.steps, rounds=args.rounds)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "preemption.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"per step: all-gather {result['all_gather_ms']:.3f} ms, preemption service "
        f"{result['service_ms'] * 1e3:.2f} us ({machine_line(result['machine'])})"
    )
    update_results_md(
        "Preemption check",
        "## Preemption check\n\n"
        f"`.venv/bin/python benchmarks/preemption.py --steps {args.steps} --rounds "
        f"{args.rounds}` ({machine_line(result['machine'])}): two processes (jax.distributed, "
        "gloo, on one machine), the per-step cost of agreeing whether to stop, medians of the "
        f"rounds: `Preemption.stop_now` (JAX's preemption service) "
        f"{result['service_ms'] * 1e3:.2f} us, the all-gather of a flag it replaced "
        f"{result['all_gather_ms']:.3f} ms (plus, in training, the wait for the queued step "
        "that an all-gather adds).",
    )


if __name__ == "__main__":
    main()
